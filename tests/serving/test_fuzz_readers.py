"""Every reader of outside files, fed random bytes, truncations and bit flips of valid files:
it returns data or raises CDCError, never anything else (see tests/fuzzing.py for the
profiles: ``HYPOTHESIS_PROFILE=long`` runs 2,000 examples per test)."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import pickle
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from datafiles import fake_fmnist, official_cifar, official_pickle, official_stl10
from fuzzing import data_or_cdcerror, mutations, mutations_of
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from cdc_serve.datasets import Dataset, read_dataset, read_label_csv
from cdc_serve.idx import check_idx, iter_idx_blocks, read_idx, read_idx_rows, write_idx
from cdc_serve.modelmeta import ModelMeta
from cdc_serve.npy import read_npy
from cdc_serve.ood import OODScorer, fit_ood
from cdc_serve.predict import iter_items, read_labels
from cdc_serve.preprocess import load_image
from cdc_serve.safe_pickle import load_cifar_pickle
from cdc_serve.triton import read_config, read_meta


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One folder per module: each example overwrites its file there."""
    return tmp_path_factory.mktemp("fuzz")


# -- IDX and what predict makes of it ----------------------------------------------------

META = SimpleNamespace(channels=1, input_size=(8, 8))  # what iter_items needs of a model


def _idx_bytes(array: np.ndarray) -> bytes:
    with tempfile.TemporaryDirectory(prefix="issue16-") as folder:
        return write_idx(Path(folder) / "a-ubyte", array).read_bytes()


VALID_IDX = [
    _idx_bytes(np.arange(3 * 6 * 5, dtype=np.uint8).reshape(3, 6, 5)),
    _idx_bytes(np.arange(12, dtype=np.int16).reshape(2, 2, 3) - 6),
    _idx_bytes(np.linspace(0, 1, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)),
    _idx_bytes(np.arange(5, dtype=np.uint8)),  # a labels file
]


def _predict_rows(path: Path) -> list:
    """What ``cdc-serve predict FILE`` reads: each row's image, or its error (at most 8)."""
    return [
        data_or_cdcerror(item.read, expect=np.ndarray)
        for item in itertools.islice(iter_items([path], META), 8)
    ]


def _all_idx_readers(path: Path) -> None:
    data_or_cdcerror(read_idx, path, expect=np.ndarray)
    data_or_cdcerror(check_idx, path, expect=tuple)
    data_or_cdcerror(read_idx_rows, path, 1, 3, expect=np.ndarray)
    data_or_cdcerror(lambda p: list(itertools.islice(iter_idx_blocks(p, block=2), 3)), path)
    data_or_cdcerror(read_labels, path, expect=np.ndarray)
    _predict_rows(path)


@given(content=mutations_of(VALID_IDX))
# 4 x 65536 images: numpy's int64 product of the dimensions wrapped to 0, so an empty file
# looked complete and reshape raised ValueError (now the product is a Python int)
@example(content=bytes([0, 0, 8, 4]) + bytes([0, 1, 0, 0]) * 4)
def test_idx(work, content):
    path = work / "x-idx3-ubyte"
    path.write_bytes(content)
    _all_idx_readers(path)


@given(content=st.one_of(mutations_of(VALID_IDX).map(gzip.compress),
                         mutations_of([gzip.compress(v) for v in VALID_IDX])))  # fmt: skip
def test_idx_gzip(work, content):
    path = work / "x-idx3-ubyte.gz"
    path.write_bytes(content)
    _all_idx_readers(path)


@pytest.fixture(scope="module")
def fmnist(work) -> Path:
    return fake_fmnist(work / "fmnist", n_train=2, n_test=3)


@given(content=mutations(_idx_bytes((np.arange(3) % 10).astype(np.uint8))))
def test_fashion_mnist_labels(fmnist, content):
    (fmnist / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(content))
    data_or_cdcerror(read_dataset, "fashion-mnist", fmnist, "test", expect=Dataset)


# -- CIFAR -------------------------------------------------------------------------------

_BATCH = {
    "batch_label": "testing batch 1 of 1",
    "labels": [3, 0, 9],
    "data": np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072),
    "filenames": ["a.png", "b.png", "c.png"],
}
VALID_CIFAR = [
    official_pickle(_BATCH),
    pickle.dumps({k.encode(): v for k, v in _BATCH.items()}, protocol=2),
    pickle.dumps(_BATCH, protocol=5),
]
DANGEROUS = ["os\nsystem", "posix\nsystem", "builtins\neval", "__builtin__\nexec",
             "subprocess\nPopen", "numpy\nload", "_codecs\ndecode", "pickle\nloads"]  # fmt: skip


@pytest.fixture(scope="module")
def cifar(work) -> Path:
    official_cifar(work / "cifar", n=2)
    return work / "cifar"


def _cifar_readers(root: Path, content: bytes) -> None:
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(content)
    data_or_cdcerror(load_cifar_pickle, path, expect=dict)
    data_or_cdcerror(read_dataset, "cifar10", root, "test", expect=Dataset)


@given(content=mutations_of(VALID_CIFAR))
# a bit flip made a BINPUT a LONG_BINPUT of memo slot 0x14580571: the C unpickler grew its
# memo array to it (2.7 GB zeroed, 4 s; the first long run was killed for memory)
@example(content=b"\x80\x02}rq\x05X\x14.")
def test_cifar_batch(cifar, content):
    _cifar_readers(cifar, content)


@given(
    name=st.one_of(st.sampled_from(DANGEROUS), st.from_regex(r"[a-z_.]{1,12}\n[a-z_]{1,12}", fullmatch=True)),
    tail=st.binary(max_size=32),
)  # fmt: skip
def test_cifar_pickle_naming_any_global(cifar, name, tail):
    """A pickle whose first global is any name: refused (or broken) before it is called."""
    _cifar_readers(cifar, b"\x80\x02c" + name.encode() + b"\n" + tail)


# -- STL-10 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stl10(work) -> tuple[Path, bytes, bytes]:
    official_stl10(work / "stl", n_train=1, n_test=2)
    folder = work / "stl" / "stl10_binary"
    return work / "stl", (folder / "test_X.bin").read_bytes(), (folder / "test_y.bin").read_bytes()


@given(which=st.sampled_from(["X", "y"]), data=st.data())
def test_stl10(stl10, which, data):
    root, x, y = stl10
    valid = {"X": x, "y": y}
    content = data.draw(mutations(valid[which]), label=f"test_{which}.bin")
    for name, value in valid.items():
        (root / "stl10_binary" / f"test_{name}.bin").write_bytes(
            content if name == which else value
        )
    data_or_cdcerror(read_dataset, "stl10", root, "test", expect=Dataset)


# -- .npy --------------------------------------------------------------------------------


def _npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=True)
    return buffer.getvalue()


VALID_NPY = [
    _npy(np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)),
    _npy(np.linspace(0, 1, 2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)),
    _npy(np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)), version=(2, 0)),
    _npy(np.array([0, 4, 1, 2], dtype=np.int64)),  # labels
    _npy(np.array([1, "a", None], dtype=object)),  # must be refused, never unpickled
]


@given(content=mutations_of(VALID_NPY))
def test_npy(work, content):
    path = work / "x.npy"
    path.write_bytes(content)
    array = data_or_cdcerror(read_npy, path)
    if isinstance(array, np.ndarray):
        np.array(array)  # every byte the header promised is there to read
    data_or_cdcerror(read_labels, path, expect=np.ndarray)
    _predict_rows(path)


# -- label files -------------------------------------------------------------------------

SOURCES = ["a.png", "b.png", "cats/c.png"]
VALID_CSV = [
    b"file,label\na.png,0\nb.png,1\ncats/c.png,2\n",
    b"b.png,1\r\na.png,0\r\ncats/c.png,4\r\n",
]
_FIELD = st.one_of(st.sampled_from([*SOURCES, "d.png", "", " 1", "-1", "1.0", '"', "file"]),
                   st.integers(-3, 2**70).map(str), st.text(max_size=6))  # fmt: skip
CSV_TEXT = st.lists(st.lists(_FIELD, min_size=0, max_size=3).map(",".join), max_size=6).map(
    lambda rows: "\n".join(rows).encode("utf-8", "surrogatepass")
)


@given(content=st.one_of(mutations_of(VALID_CSV), CSV_TEXT))
def test_label_csv(work, content):
    path = work / "labels.csv"
    path.write_bytes(content)
    labels = data_or_cdcerror(read_label_csv, path, SOURCES)
    if isinstance(labels, np.ndarray):
        assert labels.shape == (3,) and labels.dtype == np.int64 and labels.min() >= 0


# -- image files -------------------------------------------------------------------------


def _image(mode: str, fmt: str, **save) -> bytes:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode not in ("I;16",) else Image.fromarray(
        rng.integers(0, 65536, (10, 12), dtype=np.uint16)
    )  # fmt: skip
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save)
    return buffer.getvalue()


VALID_IMAGES = [
    _image("L", "PNG"), _image("RGBA", "PNG"), _image("P", "PNG"), _image("I;16", "PNG"),
    _image("RGB", "JPEG", quality=80), _image("L", "JPEG", progressive=True),
    _image("P", "GIF"), _image("RGB", "BMP"), _image("RGB", "TIFF"), _image("L", "PPM"),
    _image("RGB", "WEBP"), _image("CMYK", "TIFF", compression="tiff_lzw"),
]  # fmt: skip
MAX_PIXELS = 64 * 64  # a tiny decompression-bomb limit: a flipped header cannot ask for more


@given(content=mutations_of(VALID_IMAGES), channels=st.sampled_from([1, 3]))
def test_image_file(work, content, channels):
    path = work / "x.img"
    path.write_bytes(content)
    out = data_or_cdcerror(load_image, path, channels, (8, 8), MAX_PIXELS)
    if isinstance(out, np.ndarray):
        assert out.shape == (channels, 8, 8) and out.dtype == np.uint8


@given(content=mutations_of(VALID_IMAGES))
def test_image_folder(work, content):
    """``--dataset imagefolder:DIR`` with one good image and one fuzzed one."""
    folder = work / "images"
    folder.mkdir(exist_ok=True)
    (folder / "a.png").write_bytes(VALID_IMAGES[0])
    (folder / "b.png").write_bytes(content)
    data_or_cdcerror(read_dataset, f"imagefolder:{folder}", expect=Dataset)


# -- cdc_meta.json and config.pbtxt ------------------------------------------------------


def _valid_meta() -> dict:
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(40, 4)).astype(np.float32)
    probs = rng.dirichlet(np.ones(3), size=40).astype(np.float32)
    ood = fit_ood(embedding, probs, knn_bank=20, knn_k=2, prototypes_per_cluster=2)
    meta = ModelMeta(name="fuzz", num_classes=3, channels=1, input_size=(8, 8), mean=[0.5],
                     std=[0.25], embedding_dim=4, ood=ood)  # fmt: skip
    return meta.to_dict()


VALID_META = _valid_meta()


def _json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    )


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8),
              st.floats(allow_nan=True, allow_infinity=True), st.just(10**400)),
    _json_containers,
    max_leaves=8,
)  # fmt: skip


def _replace(meta: dict, path: list, value) -> dict:
    """``meta`` with the entry at ``path`` (keys and list indices) replaced by ``value``."""
    out = json.loads(json.dumps(meta))
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _paths(node, prefix=()) -> list[list]:
    """Every entry's path in nested dicts and (short) lists."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) and len(node) < 5 else ()  # fmt: skip
    out = []
    for key, value in items:
        out.append([*prefix, key])
        out += _paths(value, (*prefix, key))
    return out


META_TEXT = json.dumps(VALID_META, indent=2).encode()
META_FIELDS = st.tuples(st.sampled_from(_paths(VALID_META)), _JSON).map(
    lambda pv: json.dumps(_replace(VALID_META, list(pv[0]), pv[1])).encode()
)


def _client_reads_meta(path: Path) -> OODScorer:
    """What ``Client(model=...)`` does with a ``cdc_meta.json``: the metadata, its OOD
    parameters decoded, then used on a batch of the model's outputs."""
    meta = ModelMeta.read(path)
    scorer = OODScorer(meta.ood)
    embedding = np.ones((2, min(meta.embedding_dim, 64)), dtype=np.float32)
    probs = np.full((2, min(meta.num_classes, 64)), 1 / meta.num_classes, dtype=np.float32)
    scorer.flags(embedding, probs)
    return scorer


def _meta_readers(folder: Path, content: bytes) -> None:
    path = folder / "1" / "cdc_meta.json"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    data_or_cdcerror(_client_reads_meta, path, expect=OODScorer)
    data_or_cdcerror(read_meta, path.parent, expect=dict)


@given(content=mutations(META_TEXT, max_random=64))
# a JSON array nested 100,000 deep: json.loads' RecursionError escaped ModelMeta.from_json
@example(content=b"[" * 100_000)
def test_cdc_meta_json(work, content):
    _meta_readers(work, content)


@given(content=META_FIELDS)
# float(10**400) and int(Infinity) raised OverflowError out of ModelMeta.from_dict
@example(content=json.dumps(_replace(VALID_META, ["mean", 0], 10**400)).encode())
@example(content=json.dumps(_replace(VALID_META, ["input_size", 0], float("inf"))).encode())
# the OOD parameters' knn "k": null made int(None) raise TypeError out of OODScorer
@example(content=json.dumps(_replace(VALID_META, ["ood", "scores", "knn", "k"], None)).encode())
def test_cdc_meta_json_fields(work, content):
    """Valid JSON with one entry (at any depth) replaced by any JSON value."""
    _meta_readers(work, content)


CONFIG = b"""name: "fuzz"
backend: "python"
max_batch_size: 16
input [ { name: "input" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]
output [
  { name: "probs" data_type: TYPE_FP32 dims: [ 3 ] },
  { name: "embedding" data_type: TYPE_FP32 dims: [ 4 ] }
]
dynamic_batching { max_queue_delay_microseconds: 100 }
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "cdc_meta_file" value: { string_value: "cdc_meta.json" } }
"""


@given(content=mutations(CONFIG))
@example(content=b"\x80")  # not UTF-8: read_text's UnicodeDecodeError escaped read_config
def test_config_pbtxt(work, content):
    folder = work / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.pbtxt").write_bytes(content)
    data_or_cdcerror(read_config, folder)
