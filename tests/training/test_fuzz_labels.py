"""RUC's ``--labels-from labels.npy|labels.csv``, fuzzed: labels back, or one CDCError
(the profiles are tests/fuzzing.py's: ``HYPOTHESIS_PROFILE=long`` for 2,000 examples)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fuzzing import data_or_cdcerror, mutations_of
from hypothesis import example, given
from hypothesis import strategies as st

from cdc_serve_training.ruc import pseudo_labels_from

FEATURES = torch.zeros(4, 2)  # four images


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-labels")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


VALID_NPY = [_npy(np.array([0, 2, 1, 2])), _npy(np.array([0.0, 1.0, 1.0, 2.0], dtype=np.float32)),
             _npy(np.array([0, "x", None, 1], dtype=object))]  # fmt: skip
VALID_CSV = [b"0\n2\n1\n2\n", b"index,label\n3,2\n0,0\n2,1\n1,2\n"]
CSV_TEXT = st.lists(
    st.lists(st.one_of(st.integers(-2, 2**70).map(str), st.text(max_size=4)), max_size=3).map(
        ",".join
    ),
    max_size=6,
).map(lambda rows: "\n".join(rows).encode("utf-8", "surrogatepass"))


def _read(path):
    labels, confidences = pseudo_labels_from(path, FEATURES, 3)
    assert labels.shape == (4,) and confidences is None
    assert int(labels.min()) >= 0 and int(labels.max()) < 3
    return labels


@given(content=mutations_of(VALID_NPY))
def test_labels_npy(work, content):
    path = work / "labels.npy"
    path.write_bytes(content)
    data_or_cdcerror(_read, path, expect=torch.Tensor)


@given(content=st.one_of(mutations_of(VALID_CSV), CSV_TEXT))
# (from reading the old parser) a label of 2^70: np.array(..., dtype=int64) raised OverflowError
@example(content=b"1180591620717411303424\n0\n0\n0\n")
def test_labels_csv(work, content):
    path = work / "labels.csv"
    path.write_bytes(content)
    data_or_cdcerror(_read, path, expect=torch.Tensor)
