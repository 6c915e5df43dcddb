"""CIFAR pickles: official-format files load, crafted ones are refused before any code runs."""

from __future__ import annotations

import builtins
import codecs
import os
import pickle
import re
import subprocess

import numpy as np
import pytest

from cdc_serve import CDCError
from cdc_serve.safe_pickle import load_cifar_pickle


class _Payload:
    """Unpickling this calls ``func(*args)``: how a crafted data file runs code."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _batch(n: int = 4, protocol: int = 2) -> bytes:
    """A batch in the official structure: bytes keys, a uint8 N x 3072 array, int labels."""
    rng = np.random.default_rng(0)
    return pickle.dumps(
        {
            b"batch_label": b"training batch 1 of 5",
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        },
        protocol=protocol,
    )


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_official_format_loads(tmp_path, protocol):
    path = tmp_path / "data_batch_1"
    path.write_bytes(_batch(protocol=protocol))
    batch = load_cifar_pickle(path)
    assert set(batch) == {"batch_label", "labels", "data", "filenames"}
    assert batch["data"].dtype == np.uint8 and batch["data"].shape == (4, 3072)
    assert len(batch["labels"]) == 4


@pytest.mark.parametrize(
    ("func", "refused"),
    [
        (os.system, r"(posix|os)\.system"),
        (builtins.eval, r"(__builtin__|builtins)\.eval"),
        (subprocess.Popen, r"(commands|subprocess)\.Popen"),
    ],
)
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, func, refused):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    args = {
        os.system: (command,),
        builtins.eval: (f"open({str(marker)!r}, 'w').close()",),
        subprocess.Popen: (["touch", str(marker)],),
    }[func]
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Payload(func, *args), b"labels": [1]}, protocol=2))
    with pytest.raises(
        CDCError, match=rf"{re.escape(str(path))}: refusing to load it: .*{refused}"
    ):
        load_cifar_pickle(path)
    assert not marker.exists()  # the payload did not run
    # the same payload unpickled without the restriction does run: the test can fail
    pickle.loads(path.read_bytes())
    if func is subprocess.Popen:
        import time

        for _ in range(50):
            if marker.exists():
                break
            time.sleep(0.05)
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [b"", b"not a pickle at all", _batch()[:40], pickle.dumps([1, 2, 3]),
     pickle.dumps({b"data": {b"nested": {1: 2}}}), pickle.dumps({1: b"x"}),
     pickle.dumps({b"data": np.array([object()], dtype=object)})],
)  # fmt: skip
def test_malformed_files_give_one_clear_error(tmp_path, payload):
    path = tmp_path / "test_batch"
    path.write_bytes(payload)
    with pytest.raises(CDCError, match="test_batch"):
        load_cifar_pickle(path)


def test_train_on_a_crafted_cifar_folder_is_one_line_and_runs_nothing(tmp_path):
    """The user's path: `cdc-serve train --dataset cifar10` on a folder of crafted batches."""
    import subprocess
    import sys

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Payload(os.system, f"touch {marker}"), b"labels": [0]})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(payload)
    done = subprocess.run(
        [sys.executable, "-m", "cdc_serve.cli", "train", "--dataset", "cifar10", "--data-root",
         str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to load it" in lines[0] and "data_batch_1" in lines[0]
    assert "Traceback" not in done.stderr and not marker.exists()


@pytest.mark.parametrize(
    ("func", "args", "refused"),
    [
        (np.ndarray, ((10**9,), "O"), "calls numpy.ndarray itself"),
        (np.core.multiarray._reconstruct, (np.ndarray, (10**9,), "O"), r"shape \(1000000000,\)"),
        (np.core.multiarray._reconstruct, (np.ndarray, (0,), "O"), "dtype object"),
        (np.dtype, ("O",), "dtype object"),
        (codecs.encode, ("x", "rot13"), "encodes text with 'rot13'"),
    ],
    ids=["ndarray", "reconstruct-big", "reconstruct-object", "dtype-object", "codec"],
)
def test_allowed_names_do_only_what_an_array_needs(tmp_path, func, args, refused):
    """The numpy names a batch needs, used otherwise (a 10^9-element object array would fill
    8 GB with None before any check): refused before they build anything."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Payload(func, *args)}, protocol=2))
    with pytest.raises(
        CDCError, match=rf"data_batch_1: refusing to load it: the pickle .*{refused}"
    ):
        load_cifar_pickle(path)


def test_a_memo_index_costs_no_memory(tmp_path):
    """LONG_BINPUT naming memo slot 2^31 - 1: the C unpickler grows its memo array to it
    (16+ GB, zeroed); the one used here keeps a dict."""
    import subprocess
    import sys

    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x02}r\xff\xff\xff\x7f.")  # {} put in memo slot 0x7fffffff
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from cdc_serve.safe_pickle import load_cifar_pickle\n"
        "assert load_cifar_pickle(sys.argv[1]) == {}\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
