"""Score a trained image folder against labels kept outside it (the issue-14 quality run).

``python -m benchmarks.folder_quality FOLDER LABELS.csv RUN`` prints, as JSON:

- ``kmeans_raw_pixels``: K-means (scikit-learn, 10 restarts) on the images' raw grayscale
  pixels at the run's input size, the baseline a clustering model must beat;
- ``cal``: ACC, NMI, ARI and ECE (15 bins) of ``RUN/assignments.csv``, the calibration
  head's cluster and confidence per image, after Hungarian matching to the labels.

Only the image's own confidence enters the ECE, so scoring ``assignments.csv`` gives the
same ECE as the full probabilities would.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def _probs_from(clusters: np.ndarray, confidence: np.ndarray, k: int) -> np.ndarray:
    """Probability rows with the given argmax and maximum (the rest spread evenly)."""
    rest = (1.0 - confidence) / max(k - 1, 1)
    probs = np.repeat(rest[:, None], k, axis=1)
    probs[np.arange(len(clusters)), clusters] = confidence
    return probs


def score(folder: Path, labels_csv: Path, run: Path) -> dict:
    from sklearn.cluster import KMeans

    from cdc_serve.datasets import read_label_csv
    from cdc_serve.image_folder import read_image_folder
    from cdc_serve.metrics import cluster_acc, evaluate_labels, expected_calibration_error

    with open(run / "assignments.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sources = [str(Path(r["source"]).relative_to(folder)) for r in rows]
    labels = read_label_csv(labels_csv, sources)
    clusters = np.asarray([int(r["cluster_id"]) for r in rows])
    confidence = np.asarray([float(r["confidence"]) for r in rows])
    k = int(max(labels.max(), clusters.max()) + 1)
    meta = json.loads((run / "train_log.json").read_text())["config"]["data"]
    gray = read_image_folder(folder, tuple(meta["input_size"]), channels=1, progress=False)
    pixels = gray.images.reshape(len(gray.images), -1).astype(np.float32) / 255.0
    truth = read_label_csv(labels_csv, gray.sources)
    raw = KMeans(k, n_init=10, random_state=0).fit_predict(pixels)
    cal = evaluate_labels(labels, clusters)
    cal["ece"] = expected_calibration_error(labels, _probs_from(clusters, confidence, k))
    return {
        "n": len(rows),
        "kmeans_raw_pixels": {"acc": cluster_acc(truth, raw)},
        "cal": cal,
        "estimated_accuracy": float(confidence.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    print(json.dumps(score(args.folder.resolve(), args.labels, args.run), indent=2))


if __name__ == "__main__":
    main()
