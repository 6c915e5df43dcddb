"""``cdc-serve report``: the page people open first to judge a clustering by looking at it.

From a predictions file (an ``assignments.csv`` of ``cdc-serve train`` or the output of
``cdc-serve predict``, read by :mod:`cdc_serve.report_rows`), :func:`make_report`
writes into a folder:

- ``cluster_<id>.png``, one contact sheet per non-empty cluster
  (:mod:`cdc_serve.contact_sheet`): its most confident accepted images, the accepted
  ones closest to the threshold, the rejected ones (least confident first) and the
  ones flagged out of distribution (highest OOD score first);
- ``reliability.png`` when labels are given (:func:`cdc_serve.plots.reliability_diagram`);
- ``index.html`` (:mod:`cdc_serve.report_html`): a summary, a table of the clusters and
  one section per cluster with its sheet; static, with relative links only.

One pass over the rows keeps, per cluster, a few counts and four bounded heaps
(:class:`TopK`, :data:`STRIP_ROWS` x :data:`~cdc_serve.contact_sheet.COLUMNS` rows
each), so memory does not grow with the file; only the thumbnails shown are decoded
(:mod:`cdc_serve.thumbnails`, at most 40 per cluster). With labels, three compact
numbers per row are kept as well, for the Hungarian matching.

Rejection: a row is rejected when its confidence is below ``reject_below``; without
``reject_below`` the file's own ``rejected`` column is used where there is one (what
``predict`` decided), else the threshold 0.8. Labels come from ``labels`` (an IDX or
``.npy`` file aligned with the rows, as ``predict --labels`` takes) or from a ``label``
column; with them the page shows the accuracy after Hungarian matching, overall and
per cluster (and the class each cluster is matched to), the ECE, and marks every
thumbnail right (green) or wrong (red).

Bad input is one :class:`cdc_serve.CDCError`: a missing or foreign file, zero rows,
labels that do not line up. Unreadable sources are not: their tiles say so and the
page counts them.
"""

from __future__ import annotations

import heapq
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cdc_serve import CDCError
from cdc_serve.contact_sheet import COLUMNS, TILE, Strip, Tile, draw_sheet, sheet_size
from cdc_serve.predict import read_labels
from cdc_serve.report_rows import Row, read_rows
from cdc_serve.thumbnails import load_thumbnails

__all__ = ["DEFAULT_REJECT_BELOW", "ClusterSummary", "Report", "TopK", "make_report"]

DEFAULT_REJECT_BELOW = 0.8
# Rows of thumbnails per strip of a contact sheet (each row holds COLUMNS thumbnails).
STRIP_ROWS = {"confident": 2, "border": 1, "rejected": 1, "ood": 1}
SHEET_SIZE = sheet_size(list(STRIP_ROWS.values()))  # (width, height) of every contact sheet
INDEX_FILE = "index.html"
RELIABILITY_FILE = "reliability.png"
_EXAMPLES = 5  # error messages quoted on the page


class TopK:
    """The ``k`` rows with the largest keys seen so far (ties: the earlier row), in O(k) memory."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._heap: list[tuple[float, int, Row]] = []

    def add(self, key: float, row: Row) -> None:
        entry = (key, -row.index, row)  # row indices are unique: rows are never compared
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def rows(self) -> list[Row]:
        """The rows kept, largest key first."""
        return [entry[2] for entry in sorted(self._heap, key=lambda e: e[:2], reverse=True)]


def _heap(strip: str) -> TopK:
    return TopK(STRIP_ROWS[strip] * COLUMNS)


@dataclass
class ClusterTally:
    """What one pass keeps of a cluster: counts, and the rows its contact sheet shows."""

    size: int = 0
    confidence_sum: float = 0.0
    n_rejected: int = 0
    n_ood: int = 0
    confident: TopK = field(default_factory=lambda: _heap("confident"))
    border: TopK = field(default_factory=lambda: _heap("border"))
    rejected: TopK = field(default_factory=lambda: _heap("rejected"))
    ood: TopK = field(default_factory=lambda: _heap("ood"))

    def add(self, row: Row) -> None:
        confidence = float(row.confidence)  # type: ignore[arg-type]
        self.size += 1
        self.confidence_sum += confidence
        if row.rejected:
            self.n_rejected += 1
            self.rejected.add(-confidence, row)
        else:
            self.confident.add(confidence, row)
            self.border.add(-confidence, row)
        if row.ood:
            self.n_ood += 1
            self.ood.add(row.ood_score if row.ood_score is not None else -confidence, row)


class Tally:
    """The whole pass: clusters, error rows and, for rows with a label, compact arrays."""

    def __init__(self, labels: np.ndarray | None, use_column: bool, reject_below: float) -> None:
        self.labels = labels
        self.use_column = use_column
        self.reject_below = reject_below
        self.clusters: dict[int, ClusterTally] = {}
        self.n_rows = 0
        self.n_errors = 0
        self.error_examples: list[str] = []
        self.cluster = array("q")  # rows with a label only
        self.confidence = array("d")
        self.label = array("q")
        self.accepted = array("b")

    def add(self, row: Row) -> None:
        self.n_rows += 1
        if self.labels is not None:
            row.label = int(self.labels[row.index]) if row.index < len(self.labels) else None
        if row.error is not None:
            self.n_errors += 1
            if len(self.error_examples) < _EXAMPLES:
                self.error_examples.append(f"{row.source}: {row.error}")
            return
        if not (self.use_column and row.rejected is not None):
            row.rejected = row.confidence < self.reject_below  # type: ignore[operator]
        self.clusters.setdefault(row.cluster_id, ClusterTally()).add(row)  # type: ignore[arg-type]
        if row.label is not None:
            self.cluster.append(row.cluster_id)  # type: ignore[arg-type]
            self.confidence.append(row.confidence)  # type: ignore[arg-type]
            self.label.append(row.label)
            self.accepted.append(not row.rejected)


# -- the report ---------------------------------------------------------------------------


@dataclass
class ClusterSummary:
    """One cluster as the page shows it."""

    cluster_id: int
    size: int
    mean_confidence: float
    n_rejected: int
    n_ood: int
    sheet: str
    accuracy: float | None = None
    matched_class: int | None = None

    @property
    def n_accepted(self) -> int:
        return self.size - self.n_rejected


@dataclass
class Report:
    """Everything ``index.html`` shows, and the files written."""

    predictions: Path
    out: Path
    n_rows: int
    n_errors: int
    error_examples: list[str]
    num_clusters: int
    clusters: list[ClusterSummary]
    rejection: str
    reject_below: float | None
    has_ood: bool
    labels_from: str | None = None
    accuracy: float | None = None
    accuracy_accepted: float | None = None
    ece: float | None = None
    n_labelled: int = 0
    reliability: str | None = None
    n_unreadable: int = 0
    unreadable_examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def index(self) -> Path:
        return self.out / INDEX_FILE

    @property
    def sheet_size(self) -> tuple[int, int]:
        return SHEET_SIZE

    @property
    def n_scored(self) -> int:
        return self.n_rows - self.n_errors

    @property
    def n_accepted(self) -> int:
        return sum(c.n_accepted for c in self.clusters)

    @property
    def n_ood(self) -> int:
        return sum(c.n_ood for c in self.clusters)

    @property
    def mean_confidence(self) -> float:
        return sum(c.mean_confidence * c.size for c in self.clusters) / self.n_scored

    @property
    def empty_clusters(self) -> list[int]:
        present = {c.cluster_id for c in self.clusters}
        return [k for k in range(self.num_clusters) if k not in present]

    def format(self) -> str:
        """The lines ``cdc-serve report`` prints."""
        lines = [
            f"report: {self.index}",
            f"  {self.n_rows} rows, {self.n_errors} of them errors; {len(self.clusters)} of "
            f"{self.num_clusters} clusters hold images ({len(self.empty_clusters)} empty)",
            f"  mean confidence (label-free accuracy estimate): {self.mean_confidence:.3f}; "
            f"accepted: {self.n_accepted} ({100 * self.n_accepted / self.n_scored:.1f} %)",
        ]
        if self.accuracy is not None:
            lines.append(
                f"  accuracy after Hungarian matching: {self.accuracy:.3f}, ECE {self.ece:.3f}"
            )
        if self.n_unreadable:
            lines.append(f"  unreadable sources (tiles left grey): {self.n_unreadable}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _check(tally: Tally, predictions: Path, labels: Path | None) -> None:
    """Refuse a file with nothing to show, and labels that do not line up with its rows."""
    if tally.n_rows == 0:
        raise CDCError(f"{predictions}: holds no rows")
    if tally.n_errors == tally.n_rows:
        raise CDCError(
            f"{predictions}: all {tally.n_rows} rows are errors, there is nothing to show "
            f"(first: {tally.error_examples[0]})"
        )
    if tally.labels is not None and len(tally.labels) != tally.n_rows:
        raise CDCError(
            f"{labels}: {len(tally.labels)} labels for {tally.n_rows} rows of {predictions} "
            "(labels must be aligned with the rows)"
        )


def _num_clusters(tally: Tally, given: int | None) -> int:
    top = max(tally.clusters) + 1
    if given is None:
        return top
    if given < top:
        raise CDCError(f"--num-clusters {given}: the file has cluster_id {top - 1}")
    return given


def _new_report(
    tally: Tally, predictions: Path, out: Path, has_ood: bool, num_clusters: int | None
) -> Report:
    """The Report of a finished pass (rejection by the threshold, labels from a column)."""
    return Report(
        predictions=predictions,
        out=out,
        n_rows=tally.n_rows,
        n_errors=tally.n_errors,
        error_examples=tally.error_examples,
        num_clusters=_num_clusters(tally, num_clusters),
        clusters=_summaries(tally),
        rejection=f"confidence below {tally.reject_below:g}",
        reject_below=tally.reject_below,
        has_ood=has_ood,
        labels_from="label column" if len(tally.label) else None,
    )


def _summaries(tally: Tally) -> list[ClusterSummary]:
    return [
        ClusterSummary(
            cluster_id=cid,
            size=c.size,
            mean_confidence=c.confidence_sum / c.size,
            n_rejected=c.n_rejected,
            n_ood=c.n_ood,
            sheet=f"cluster_{cid}.png",
        )
        for cid, c in sorted(tally.clusters.items())
    ]


def _probs_from_confidence(
    cluster: np.ndarray, confidence: np.ndarray, k: int
) -> tuple[np.ndarray, int]:
    """An ``N x K`` probability matrix whose maximum is each row's confidence, at its
    cluster (the rest spread evenly), for the metrics that take probabilities.

    A confidence below ``1 / K`` cannot be a maximum probability: it is raised just
    above ``1 / K`` (the second value returned counts those rows).
    """
    k = max(k, 2)
    floor = 1.0 / k + 1e-6
    low = confidence < floor
    conf = np.where(low, floor, confidence)
    probs = np.repeat(((1.0 - conf) / (k - 1))[:, None], k, axis=1)
    probs[np.arange(len(conf)), cluster] = conf
    return probs, int(low.sum())


def _add_label_metrics(report: Report, tally: Tally) -> np.ndarray:
    """Accuracy (all, accepted, per cluster), ECE and the reliability diagram; the matching."""
    from cdc_serve import metrics, plots

    cluster = np.asarray(tally.cluster, dtype=np.int64)
    label = np.asarray(tally.label, dtype=np.int64)
    accepted = np.asarray(tally.accepted, dtype=bool)
    mapping = metrics.hungarian_match(label, cluster, num_clusters=report.num_clusters)
    correct = mapping[cluster] == label
    report.n_labelled = len(label)
    report.accuracy = float(correct.mean())
    report.accuracy_accepted = float(correct[accepted].mean()) if accepted.any() else None
    hits = np.bincount(cluster, weights=correct, minlength=report.num_clusters)
    counts = np.bincount(cluster, minlength=report.num_clusters)
    for c in report.clusters:
        if counts[c.cluster_id]:
            c.accuracy = float(hits[c.cluster_id] / counts[c.cluster_id])
            c.matched_class = int(mapping[c.cluster_id]) if mapping[c.cluster_id] >= 0 else None
    probs, raised = _probs_from_confidence(
        cluster, np.asarray(tally.confidence), report.num_clusters
    )
    if raised:
        report.notes.append(
            f"{raised} confidences below 1/{report.num_clusters} drawn at 1/{report.num_clusters} "
            "in the reliability diagram (not a maximum probability)"
        )
    report.ece = metrics.expected_calibration_error(label, probs)
    plots.reliability_diagram(label, probs, report.out / RELIABILITY_FILE, title="All clusters")
    report.reliability = RELIABILITY_FILE
    return mapping


# -- contact sheets -------------------------------------------------------------------------


def _shown(c: ClusterTally) -> dict[str, list[Row]]:
    """The rows of each strip; the borderline strip leaves out those already shown."""
    confident = c.confident.rows()
    seen = {r.index for r in confident}
    return {
        "confident": confident,
        "border": [r for r in c.border.rows() if r.index not in seen],
        "rejected": c.rejected.rows(),
        "ood": c.ood.rows(),
    }


def _titles(c: ClusterTally, report: Report) -> dict[str, tuple[str, str]]:
    """Each strip's title and what it says when it is empty."""
    threshold = f" ({report.reject_below:g})" if report.reject_below is not None else ""
    ood = (
        (f"Flagged out of distribution: {c.n_ood}, highest OOD score first", "none flagged")
        if report.has_ood
        else ("Flagged out of distribution", "no ood column in the predictions file")
    )
    return {
        "confident": (f"Most confident, of {c.size - c.n_rejected} accepted", "none accepted"),
        "border": (f"Accepted, closest to the threshold{threshold}", "none besides those above"),
        "rejected": (f"Rejected: {c.n_rejected}, least confident first", "none rejected"),
        "ood": ood,
    }


def _tile(row: Row, thumbnail, mapping: np.ndarray | None) -> Tile:
    correct = None
    if mapping is not None and row.label is not None:
        correct = bool(mapping[row.cluster_id] == row.label)
    image = thumbnail if not isinstance(thumbnail, str) else None
    return Tile(image=image, caption=f"{row.confidence:.3f}", correct=correct)


def _write_sheets(
    report: Report, tally: Tally, mapping: np.ndarray | None, roots: list[Path]
) -> None:
    """Load the thumbnails shown (all clusters at once: one pass per array file), draw each sheet."""
    shown = {cid: _shown(c) for cid, c in tally.clusters.items()}
    sources = [r.source for strips in shown.values() for rows in strips.values() for r in rows]
    thumbnails = load_thumbnails(sources, roots, box=TILE)
    unreadable = [message for message in thumbnails.values() if isinstance(message, str)]
    report.n_unreadable = len(unreadable)
    report.unreadable_examples = unreadable[:_EXAMPLES]
    for summary in report.clusters:
        titles = _titles(tally.clusters[summary.cluster_id], report)
        strips = [
            Strip(title=titles[name][0], rows=STRIP_ROWS[name], empty_text=titles[name][1],
                  tiles=[_tile(r, thumbnails[r.source], mapping) for r in rows])
            for name, rows in shown[summary.cluster_id].items()
        ]  # fmt: skip
        draw_sheet(strips, report.out / summary.sheet)


def make_report(
    predictions: Path,
    out: Path,
    reject_below: float | None = None,
    labels: Path | None = None,
    root: Path | None = None,
    num_clusters: int | None = None,
) -> Report:
    """Write ``out/index.html`` and its PNGs for a predictions file (see the module docstring).

    ``root``: the folder relative sources are relative to (default: the current folder,
    then the predictions file's folder). ``num_clusters``: how many clusters the model
    has (default: the largest ``cluster_id`` + 1), to count the empty ones.
    """
    from cdc_serve.report_html import render

    predictions, out = Path(predictions), Path(out)
    if reject_below is not None and not 0.0 <= reject_below <= 1.0:
        raise CDCError(f"--reject-below must lie in [0, 1], got {reject_below}")
    columns, rows = read_rows(predictions)
    label_array = read_labels(Path(labels)) if labels is not None else None
    use_column = reject_below is None and columns.rejected
    threshold = DEFAULT_REJECT_BELOW if reject_below is None else reject_below
    tally = Tally(label_array, use_column, threshold)
    for row in rows:
        tally.add(row)
    _check(tally, predictions, labels)
    report = _new_report(tally, predictions, out, columns.ood, num_clusters)
    if use_column:
        report.rejection, report.reject_below = "the predictions file's rejected column", None
    if labels is not None:
        report.labels_from = str(labels)
    out.mkdir(parents=True, exist_ok=True)
    mapping = _add_label_metrics(report, tally) if len(tally.label) else None
    roots = [Path(root)] if root is not None else [Path(os.getcwd()), predictions.parent]
    _write_sheets(report, tally, mapping, roots)
    report.index.write_text(render(report), encoding="utf-8")
    return report
