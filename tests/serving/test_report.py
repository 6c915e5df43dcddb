"""``cdc-serve report``: the page, its contact sheets, bad input, bounded work, a real browser.

The end-to-end test scores real images (Fashion-MNIST from Debian's dataset-fashion-mnist,
else scikit-learn's bundled digits) of every source kind (PNG files, ``.npy[i]``, IDX
``[i]``) with a real exported model, writes the report with the CLI, opens it in
headless Chromium and checks the screenshot shows the page and the contact sheets.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_export import make_exported_model
from typer.testing import CliRunner

from cdc_serve import CDCError, contact_sheet, thumbnails
from cdc_serve.cli import app
from cdc_serve.idx import read_idx_rows, write_idx
from cdc_serve.predict import predict
from cdc_serve.report import SHEET_SIZE, STRIP_ROWS, TopK, make_report
from cdc_serve.report_rows import Row
from cdc_serve.thumbnails import parse_source

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_MISSING = (
    "no Chromium on PATH: `make browser` installs Debian's chromium when run as root with "
    "apt (`make test` does it first); elsewhere install chromium to run this test"
)


def real_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real uint8 ``H x W`` images and their labels."""
    if (FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
        images = read_idx_rows(FMNIST / "t10k-images-idx3-ubyte.gz", 0, n)
        labels = read_idx_rows(FMNIST / "t10k-labels-idx1-ubyte.gz", 0, n)
        return images, labels.astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:n] * 255 / 16).round().astype(np.uint8)
    return images, digits.target[:n].astype(np.int64)


def expected_sheet_size() -> tuple[int, int]:
    """A contact sheet's size worked out from the layout constants (not by sheet_size)."""
    c = contact_sheet
    rows = list(STRIP_ROWS.values())
    width = 2 * c.MARGIN + c.COLUMNS * c.TILE + (c.COLUMNS - 1) * c.GAP
    cell = c.TILE + c.BAR + c.CAPTION
    strips = [c.TITLE + r * cell + (r - 1) * c.GAP for r in rows]
    return width, 2 * c.MARGIN + sum(strips) + (len(rows) - 1) * c.STRIP_GAP


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def page_images(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


# -- a real predict output over every kind of source -----------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """300 real images as IDX, 20 as ``.npy``, 12 as PNG files (+ one broken PNG), scored by
    a real exported model; labels aligned with the output rows."""
    root = tmp_path_factory.mktemp("report")
    images, labels = real_images(332)
    size = images.shape[1:]
    write_idx(root / "imgs-idx3-ubyte.gz", images[:300])
    np.save(root / "more.npy", images[300:320])
    folder = root / "pngs"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(images[320 + i]).save(folder / f"img{i:02d}.png")
    (folder / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model = make_exported_model(root / "repo", size=tuple(size))
    preds = root / "preds.csv"
    predict([folder, root / "more.npy", root / "imgs-idx3-ubyte.gz"], model=model, output=preds)
    label_of = {f"{root / 'imgs-idx3-ubyte.gz'}[{i}]": labels[i] for i in range(300)}
    label_of.update({f"{root / 'more.npy'}[{i}]": labels[300 + i] for i in range(20)})
    label_of.update({str(folder / f"img{i:02d}.png"): labels[320 + i] for i in range(12)})
    with open(preds, newline="") as f:
        sources = [row["source"] for row in csv.DictReader(f)]
    np.save(root / "labels.npy", np.array([label_of.get(s, 0) for s in sources]))
    return root, preds, root / "labels.npy"


def run_cli(*args: str):
    return CliRunner().invoke(app, ["report", *map(str, args)])


def test_report_of_a_predict_output(scored):
    root, preds, labels = scored
    out = root / "page"
    result = run_cli(preds, "--out", out, "--labels", labels, "--reject-below", "0.5")
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and "333 rows, 1 of them errors" in result.output
    html = (out / "index.html").read_text()
    shown = page_images(html)
    sheets = sorted(out.glob("cluster_*.png"))
    assert sorted(shown) == sorted([p.name for p in sheets] + ["reliability.png"])
    for name in shown:  # every image of the page exists and decodes; sheets have the grid size
        with Image.open(out / name) as image:
            image.load()
            if name.startswith("cluster_"):
                assert image.size == expected_sheet_size() == SHEET_SIZE
    assert "http" not in html.replace('lang="en"', "") and "<script" not in html
    assert "zz-broken.png" in html  # the error row is listed
    assert "Accuracy" in html and "matched to class" in html


def test_report_object_numbers(scored):
    root, preds, labels = scored
    report = make_report(preds, root / "numbers", labels=labels, reject_below=0.9)
    with open(preds, newline="") as f:
        rows = [r for r in csv.DictReader(f) if not r["error"]]
    conf = np.array([float(r["confidence"]) for r in rows])
    assert report.n_rows == 333 and report.n_errors == 1 and report.n_scored == 332
    assert report.n_accepted == int((conf >= 0.9).sum())
    assert report.mean_confidence == pytest.approx(conf.mean())
    assert report.n_ood == sum(r["ood"] == "true" for r in rows)
    assert report.n_unreadable == 0
    assert sum(c.size for c in report.clusters) == 332
    assert 0.0 <= report.accuracy <= 1.0 and report.ece is not None


# -- the browser -------------------------------------------------------------------------------


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return found
    pytest.skip(CHROMIUM_MISSING)


def screenshot(page: Path, png: Path, size: tuple[int, int]) -> np.ndarray:
    """Headless Chromium's screenshot of ``page`` (a viewport of ``size``), as RGB pixels."""
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--force-device-scale-factor=1", "--disable-dev-shm-usage",
        f"--user-data-dir={png.parent / 'chromium-profile'}", f"--window-size={size[0]},{size[1]}",
        f"--screenshot={png}", page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert png.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-3000:]}"
    with Image.open(png) as shot:
        return np.asarray(shot.convert("RGB"), dtype=np.int16)


def find_patch(shot: np.ndarray, patch: np.ndarray, tolerance: int = 6) -> tuple[int, int] | None:
    """Top-left ``(y, x)`` where ``patch`` appears in ``shot`` (per-channel tolerance)."""
    # Anchor the search on the patch's most mid-grey pixel: rare on a white page with black text.
    ay, ax = map(int, np.unravel_index(np.abs(patch[..., 0] - 128).argmin(), patch.shape[:2]))
    hits = np.argwhere(np.all(np.abs(shot - patch[ay, ax]) <= tolerance, axis=-1))
    h, w = patch.shape[:2]
    for y, x in hits:
        top, left = y - ay, x - ax
        if top < 0 or left < 0 or top + h > shot.shape[0] or left + w > shot.shape[1]:
            continue
        if np.abs(shot[top : top + h, left : left + w] - patch).max() <= tolerance:
            return int(top), int(left)
    return None


@pytest.mark.slow
def test_page_in_a_real_browser(scored, tmp_path):
    root, preds, labels = scored
    out = tmp_path / "page"
    result = run_cli(preds, "--out", out, "--labels", labels, "--reject-below", "0.5")
    assert result.exit_code == 0, result.output
    shot = screenshot(out / "index.html", tmp_path / "shot.png", (1280, 2000))
    assert shot.shape == (2000, 1280, 3)
    assert shot.std() > 20, "the screenshot is (nearly) blank"
    assert (shot[:400] < 80).all(axis=-1).sum() > 500, "no dark text at the top of the page"

    first = sorted(out.glob("cluster_*.png"), key=lambda p: int(p.stem.split("_")[1]))[0]
    sheet = np.asarray(Image.open(first).convert("RGB"), dtype=np.int16)
    c = contact_sheet
    y0, x0 = c.MARGIN + c.TITLE, c.MARGIN  # the first (most confident) thumbnail
    tile = sheet[y0 : y0 + c.TILE, x0 : x0 + c.TILE]
    assert tile.std() > 10, "the first tile of the sheet holds no image"
    where = find_patch(shot, tile)
    assert where is not None, "the first contact sheet's first thumbnail is not on the screen"
    top, left = where
    region = shot[top - y0 : top - y0 + SHEET_SIZE[1], left - x0 : left - x0 + SHEET_SIZE[0]]
    assert region.shape[:2] == (SHEET_SIZE[1], SHEET_SIZE[0])
    assert region.std() > 20, "the contact sheet's region shows no image content"


# -- an assignments.csv with just the three required columns ------------------------------------


def pngs(folder: Path, n: int) -> list[str]:
    images, _ = real_images(n)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(images[i]).save(folder / f"{i:03d}.png")
    return [f"imgs/{i:03d}.png" for i in range(n)]


def test_three_columns_relative_sources_and_default_threshold(tmp_path, monkeypatch):
    sources = pngs(tmp_path / "run" / "imgs", 30)
    conf = np.linspace(0.5, 1.0, 30).round(4)
    path = write_csv(tmp_path / "run" / "assignments.csv", ["source", "cluster_id", "confidence"],
                     [[s, i % 3, f"{conf[i]:.4f}"] for i, s in enumerate(sources)])  # fmt: skip
    monkeypatch.chdir(tmp_path)  # sources are relative to the csv's folder, not to here
    report = make_report(path, tmp_path / "out")
    assert report.n_rows == 30 and report.n_unreadable == 0
    assert report.n_accepted == int((conf >= 0.8).sum())  # the default threshold
    assert report.rejection == "confidence below 0.8" and not report.has_ood
    html = report.index.read_text()
    assert "no <code>ood</code> column" in html and "reliability.png" not in html
    assert [c.cluster_id for c in report.clusters] == [0, 1, 2]

    stricter = make_report(path, tmp_path / "out2", reject_below=0.95)
    assert stricter.n_accepted == int((conf >= 0.95).sum())


def test_rejected_column_is_used_unless_a_threshold_is_given(tmp_path):
    sources = pngs(tmp_path / "imgs", 4)
    path = write_csv(tmp_path / "a.csv", ["source", "cluster_id", "confidence", "rejected"],
                     [[s, 0, "0.99", "true" if i < 3 else "false"]
                      for i, s in enumerate(sources)])  # fmt: skip
    report = make_report(path, tmp_path / "out", root=tmp_path)
    assert report.n_accepted == 1 and report.reject_below is None
    assert make_report(path, tmp_path / "out2", reject_below=0.8, root=tmp_path).n_accepted == 4


def test_label_column_and_empty_clusters(tmp_path):
    sources = pngs(tmp_path / "imgs", 12)
    rows = [[s, [0, 2][i % 2], "0.9", i % 2] for i, s in enumerate(sources)]
    rows[0][3] = 1  # one wrong
    path = write_csv(tmp_path / "a.csv", ["source", "cluster_id", "confidence", "label"], rows)
    report = make_report(path, tmp_path / "out", root=tmp_path, num_clusters=4)
    assert report.empty_clusters == [1, 3]
    assert report.labels_from == "label column" and report.n_labelled == 12
    assert report.accuracy == pytest.approx(11 / 12)
    by_id = {c.cluster_id: c for c in report.clusters}
    assert by_id[0].accuracy == pytest.approx(5 / 6) and by_id[0].matched_class == 0
    assert by_id[2].accuracy == 1.0 and by_id[2].matched_class == 1
    assert (tmp_path / "out" / "reliability.png").is_file()
    with pytest.raises(CDCError, match="--num-clusters 2"):
        make_report(path, tmp_path / "out", root=tmp_path, num_clusters=2)


def test_jsonl_with_error_rows_and_escaping(tmp_path):
    sources = pngs(tmp_path / "imgs", 3)
    lines = [{"source": s, "cluster_id": 1, "confidence": 0.9, "rejected": False, "ood": True,
              "ood_score": 3.0, "error": None} for s in sources]  # fmt: skip
    lines.append({"source": "<b>odd</b>.png", "cluster_id": None, "confidence": None,
                  "rejected": None, "ood": None, "ood_score": None,
                  "error": "<script>alert(1)</script>: not an image"})  # fmt: skip
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = make_report(path, tmp_path / "out", root=tmp_path)
    assert report.n_errors == 1 and report.n_ood == 3
    html = report.index.read_text()
    assert "<script" not in html and "&lt;script&gt;" in html and "&lt;b&gt;odd" in html


# -- unreadable sources, bounded work ----------------------------------------------------------


def test_unreadable_sources_are_counted_not_fatal(tmp_path):
    images, _ = real_images(5)
    np.save(tmp_path / "a.npy", images)
    write_idx(tmp_path / "b-idx3-ubyte", images)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = [["a.npy[1]", 0, "0.99"], ["a.npy[7]", 0, "0.98"], ["b-idx3-ubyte[4]", 0, "0.97"],
            ["b-idx3-ubyte[9]", 0, "0.96"], ["bad.png", 0, "0.95"], ["gone.png", 0, "0.94"],
            ["gone.npy[0]", 0, "0.93"]]  # fmt: skip
    path = write_csv(tmp_path / "a.csv", ["source", "cluster_id", "confidence"], rows)
    report = make_report(path, tmp_path / "out", root=tmp_path)
    assert report.n_unreadable == 5
    messages = " ".join(report.unreadable_examples)
    assert "index out of range" in messages and "file not found" in messages
    html = report.index.read_text()
    assert "Unreadable sources</th><td>5" in html
    with Image.open(tmp_path / "out" / "cluster_0.png") as sheet:
        assert sheet.size == SHEET_SIZE


def test_only_the_thumbnails_shown_are_decoded(tmp_path, monkeypatch):
    n, k = 70_000, 10
    rng = np.random.default_rng(0)
    np.save(tmp_path / "many.npy", rng.integers(0, 256, (n, 8, 8), dtype=np.uint8))
    conf = rng.random(n)
    with open(tmp_path / "preds.csv", "w", newline="") as f:
        f.write("source,cluster_id,confidence,ood\n")
        f.writelines(f"many.npy[{i}],{i % k},{conf[i]:.6f},{'true' if i % 50 == 0 else 'false'}\n"
                     for i in range(n))  # fmt: skip
    decoded = []
    real = thumbnails._to_pil
    monkeypatch.setattr(thumbnails, "_to_pil", lambda chw: decoded.append(1) or real(chw))
    report = make_report(tmp_path / "preds.csv", tmp_path / "out", root=tmp_path)
    per_cluster = sum(STRIP_ROWS.values()) * contact_sheet.COLUMNS
    assert report.n_rows == n and len(report.clusters) == k
    assert 0 < len(decoded) <= k * per_cluster <= 400
    # The first tile of cluster 0 is its most confident accepted image, enlarged 8 x.
    most = max((i for i in range(0, n, k) if conf[i] >= 0.8), key=lambda i: conf[i])
    expected = np.load(tmp_path / "many.npy")[most].repeat(8, axis=0).repeat(8, axis=1)
    c = contact_sheet
    with Image.open(tmp_path / "out" / "cluster_0.png") as sheet:
        tile = np.asarray(sheet.convert("L"))[c.MARGIN + c.TITLE :, c.MARGIN :][: c.TILE, : c.TILE]
    assert (tile == expected).all()


def test_topk_keeps_the_largest_and_the_earlier_of_ties():
    top = TopK(3)
    for i, key in enumerate([0.5, 0.9, 0.1, 0.9, 0.7, 0.9]):
        top.add(key, Row(index=i, source=str(i)))
    assert [r.index for r in top.rows()] == [1, 3, 5]
    small = TopK(2)
    for i, key in enumerate([3.0, 1.0, 2.0]):
        small.add(-key, Row(index=i, source=str(i)))
    assert [r.index for r in small.rows()] == [1, 2]


def test_parse_source():
    assert parse_source("a/b.npy[12]") == thumbnails.Source("a/b.npy", 12)
    assert parse_source("t10k-images-idx3-ubyte.gz[345]").index == 345
    assert parse_source("shot[3].png") == thumbnails.Source("shot[3].png")
    assert parse_source("weird[x]").index is None


# -- bad input: one clear error ------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, name, message",
    [
        (None, "missing.csv", "predictions file not found"),
        ("", "empty.csv", "the file is empty"),
        ("source,cluster_id,confidence\n", "header.csv", "holds no rows"),
        ("path,cluster\na.png,1\n", "other.csv", "lacks the column.s. source, cluster_id"),
        ("source,cluster_id,confidence\na.png,x,0.5\n", "bad.csv", "line 2: cluster_id 'x'"),
        ("source,cluster_id,confidence\na.png,1,1.5\n", "bad.csv", "outside \\[0, 1\\]"),
        ("source,cluster_id,confidence,error\na.png,,,boom\n", "err.csv", "all 1 rows are errors"),
        ('{"source": "a.png"}\n', "x.jsonl", "lacks the column.s. cluster_id, confidence"),
        ("{not json\n", "x.jsonl", "line 1: not JSON"),
        ("source,cluster_id,confidence\n", "x.txt", "ends in .csv or .jsonl"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(CDCError, match=message):
        make_report(path, tmp_path / "out")


def test_labels_must_line_up_and_cli_prints_one_line(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["source", "cluster_id", "confidence"],
                     [["a.png", 0, "0.9"], ["b.png", 1, "0.9"]])  # fmt: skip
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2]))
    with pytest.raises(CDCError, match="3 labels for 2 rows"):
        make_report(path, tmp_path / "out", labels=tmp_path / "labels.npy")
    result = run_cli(tmp_path / "nope.csv", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'nope.csv'}: predictions file not found"
    ]
