"""The exported model's metadata (``cdc_meta.json``): what a client needs to use a model.

An exported model is ``model.onnx`` plus ``cdc_meta.json`` beside it. The metadata
says how to preprocess an image (channels, input size, mean, std), what the graph's
tensors are called, how many clusters there are, and the OOD parameters fitted at
export time (see :mod:`cdc_serve.ood`), so a client never has to know how the model
was trained.

The file names, tensor names and the repository layout are those of
:mod:`cdc_serve.contract`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cdc_serve import CDCError, __version__
from cdc_serve.choices import Method, values
from cdc_serve.contract import (
    DEFAULT_REJECT_BELOW,
    FLOAT_INPUT_FORMAT_VERSION,
    INPUT_NAME,
    META_FILE,
    META_FORMAT,
    META_FORMAT_VERSION,
    OUTPUT_NAMES,
    find_model_file,
    version_of,
)

FORMAT = META_FORMAT
FORMAT_VERSION = META_FORMAT_VERSION
METHODS = values(Method)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ModelMeta:
    """Everything about an exported model that a client or server needs.

    ``ood`` is the output of :func:`cdc_serve.ood.fit_ood` (may be empty: then only
    scores needing no fitted parameters are available and no image is flagged).
    ``format_version`` says what the graph beside it takes and gives
    (:mod:`cdc_serve.contract`): 2, uint8 images and the per-image answer computed in
    the graph; 1 (exports made before), normalised float32 and ``probs``/``embedding``
    only. ``reject_below`` is the model's default reject threshold (callers may pick
    another per request).
    """

    name: str
    num_classes: int
    channels: int
    input_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    embedding_dim: int
    version: int = 0
    method: str = "cdc"
    input_name: str = INPUT_NAME
    outputs: tuple[str, str] = OUTPUT_NAMES
    ood: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    reject_below: float = DEFAULT_REJECT_BELOW
    dataset: str = ""
    created: str = field(default_factory=_now)
    project_version: str = __version__
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.input_size = tuple(int(v) for v in self.input_size)  # type: ignore[assignment]
        self.outputs = tuple(str(v) for v in self.outputs)  # type: ignore[assignment]
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]
        self.reject_below = float(self.reject_below)
        self.validate()

    @property
    def scores_in_graph(self) -> bool:
        """True when the graph takes uint8 images and gives cluster_id, confidence, ood_score
        and ood itself (format 2); False for the previous format (float input)."""
        return self.format_version > FLOAT_INPUT_FORMAT_VERSION

    # -- validation ---------------------------------------------------------------

    def validate(self) -> None:
        """Raise CDCError naming the first field that is wrong."""
        if self.format != FORMAT:
            raise CDCError(f"model metadata: format is {self.format!r}, expected {FORMAT!r}")
        if not isinstance(self.format_version, int) or self.format_version < 1:
            raise CDCError(f"model metadata: bad format_version {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise CDCError(
                f"model metadata: format_version {self.format_version} is newer than this "
                f"cdc-serve understands ({FORMAT_VERSION}); upgrade cdc-serve"
            )
        if self.method not in METHODS:
            raise CDCError(f"model metadata: method must be one of {METHODS}, got {self.method!r}")
        for key in ("num_classes", "channels", "embedding_dim", "version"):
            value = getattr(self, key)
            low = 0 if key == "version" else 1  # version 0: not yet placed in a repository
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise CDCError(f"model metadata: {key} must be an integer >= {low}, got {value!r}")
        if self.num_classes < 2:
            raise CDCError(f"model metadata: num_classes must be >= 2, got {self.num_classes}")
        if self.channels not in (1, 3):
            raise CDCError(f"model metadata: channels must be 1 or 3, got {self.channels}")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise CDCError(f"model metadata: input_size must be [H, W], got {self.input_size}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) != self.channels or not all(math.isfinite(v) for v in values):
                raise CDCError(
                    f"model metadata: {key} must be {self.channels} finite numbers, got {values}"
                )
        if min(self.std) <= 0:
            raise CDCError(f"model metadata: std must be positive, got {self.std}")
        if len(self.outputs) != 2:
            raise CDCError(
                f"model metadata: outputs must be (probs, embedding), got {self.outputs}"
            )
        if not 0.0 <= self.reject_below <= 1.0:
            raise CDCError(
                f"model metadata: reject_below must lie in [0, 1], got {self.reject_below}"
            )
        if not isinstance(self.ood, dict) or not isinstance(self.metrics, dict):
            raise CDCError("model metadata: ood and metrics must be JSON objects")

    # -- (de)serialisation ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        data["outputs"] = list(self.outputs)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model metadata") -> ModelMeta:
        if not isinstance(data, dict):
            raise CDCError(f"{source}: expected a JSON object")
        if data.get("format") != FORMAT:
            raise CDCError(f"{source}: not a cdc-serve export (format {data.get('format')!r})")
        known = {f.name for f in fields(cls)}
        required = {
            "name",
            "num_classes",
            "channels",
            "input_size",
            "mean",
            "std",
            "embedding_dim",
            "format_version",
        }
        missing = sorted(required - data.keys())
        if missing:
            raise CDCError(f"{source}: missing field(s) {', '.join(missing)}")
        if isinstance(data["format_version"], int) and data["format_version"] > FORMAT_VERSION:
            raise CDCError(
                f"{source}: format_version {data['format_version']} is newer than this "
                f"cdc-serve understands ({FORMAT_VERSION}); upgrade cdc-serve"
            )
        try:
            meta = cls(**{k: v for k, v in data.items() if k in known})
        except CDCError as exc:
            raise CDCError(f"{source}: {str(exc).removeprefix('model metadata: ')}") from None
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. float(10**400), int(inf)
            raise CDCError(f"{source}: invalid field ({exc})") from None
        return meta

    @classmethod
    def from_json(cls, text: str, source: str = "model metadata") -> ModelMeta:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CDCError(f"{source}: not valid JSON ({exc})") from None
        except RecursionError:
            raise CDCError(f"{source}: not metadata (JSON nested too deep)") from None
        return cls.from_dict(data, source)

    @classmethod
    def read(cls, path: str | os.PathLike) -> ModelMeta:
        path = Path(path)
        if not path.is_file():
            raise CDCError(f"{path}: model metadata file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CDCError(f"{path}: cannot read model metadata ({exc})") from None
        return cls.from_json(text, source=str(path))

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def find_model(path: str | os.PathLike) -> tuple[Path, ModelMeta]:
    """Locate ``(model.onnx, metadata)`` from a user-given path.

    ``path`` may be a repository model folder (``repo/name``: the latest numeric
    version with a ``model.onnx`` is used), a version folder (``repo/name/3``) or a
    ``.onnx`` file (its metadata is the ``cdc_meta.json`` beside it); see
    :func:`cdc_serve.contract.find_model_file`.
    """
    onnx_path = find_model_file(path)
    meta_path = onnx_path.with_name(META_FILE)
    if not meta_path.is_file():
        raise CDCError(
            f"{onnx_path}: no {META_FILE} beside the model (export it with `cdc-serve export`)"
        )
    meta = ModelMeta.read(meta_path)
    version = version_of(onnx_path)
    if version is not None:
        meta.version = version  # the repository folder is authoritative
    return onnx_path, meta
