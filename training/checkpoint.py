"""``model.pth`` (the trained model, docs/ARCHITECTURE.md) and per-stage training checkpoints.

Everything is a ``torch.save`` of plain containers and tensors, written atomically
(temporary file + rename) and read with ``torch.load(weights_only=True)``, which refuses
pickles that would run code. ``load_model`` turns every way a file can be wrong into one
:class:`cdc_serve.CDCError` naming the problem: missing, truncated or not a torch file,
a crafted pickle, another format or version, a class count that disagrees with the
weights, missing or unexpected weights.

Resume, one scheme for every stage (MoCo-v2, the head init, CDC, RUC):

- a stage's *fingerprint* (:func:`fingerprint`) is a flat dict of everything that must
  be equal for a checkpoint to belong to the same run: the stage's settings, the seed,
  the number of images and the process count (``world_size``, 1 without torchrun); the
  epoch count is left out, so a run may be resumed with more epochs;
- :func:`save_stage` writes ``{format, fingerprint, epoch, state...}`` atomically after
  every epoch (or once, for a stage's final result such as ``backbone.pt``); under
  torchrun rank 0 alone writes;
- :func:`load_stage` returns ``None`` where no checkpoint exists, and otherwise either
  the saved state or the one :class:`cdc_serve.CDCError` that names every setting that
  changed (``seed 0 -> 1``), with what to do.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cdc_serve import CDCError, __version__
from cdc_serve_training import distributed
from cdc_serve_training.heads import ClusteringModel

FORMAT = "cdc-serve/model"
FORMAT_VERSION = 1
ARCH_KEYS = ("backbone", "in_channels", "input_size", "feature_dim", "hidden_dim", "num_classes")


# ----------------------------------------------------------------------------------------------
# Atomic save / safe load of any checkpoint
# ----------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with every failure as a CDCError."""
    path = Path(path)
    if not path.is_file():
        raise CDCError(f"no such file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "pickle protocol N" noise on junk files
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CDCError(
                f"refusing to unpickle {path}: it contains objects other than tensors and "
                "plain containers (possibly code); only trusted cdc-serve files can be loaded"
            ) from None
        raise CDCError(f"{path} is not a readable torch file ({exc})") from None
    except Exception as exc:  # the unpickler fails in many ways on junk (IndexError, EOFError, ...)
        raise CDCError(
            f"cannot read {path}: truncated, corrupt or not a torch file ({type(exc).__name__})"
        ) from None


# ----------------------------------------------------------------------------------------------
# Resume: fingerprint + epochs done, for every stage
# ----------------------------------------------------------------------------------------------

STAGE_FORMAT = "cdc-serve/stage-checkpoint"
STAGE_FORMAT_VERSION = 1


def _plain(value: Any) -> Any:
    """JSON-like value for comparison: tuples become lists, numbers stay numbers."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = _plain(value)
    return flat


def fingerprint(
    stage: str,
    settings: Mapping[str, Any],
    *,
    seed: int,
    n_images: int,
    world_size: int | None = None,
    ignore: tuple[str, ...] = ("epochs",),
) -> dict[str, Any]:
    """What must match for a checkpoint of ``stage`` to be resumed (flat, JSON-like).

    ``settings`` is the stage's configuration (a dataclass's ``asdict`` or any mapping,
    nested mappings are flattened to dotted names); the keys in ``ignore`` (the epoch
    count, by default) may change between runs. ``world_size`` is the number of
    processes, by default this run's (``distributed.world_size()``: 1 without torchrun).
    """
    if world_size is None:
        world_size = distributed.world_size()
    flat = {k: v for k, v in _flatten(settings).items() if k.split(".")[-1] not in ignore}
    return {
        "stage": stage,
        "seed": int(seed),
        "n_images": int(n_images),
        "world_size": int(world_size),
        **flat,
    }


def changed_settings(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``["seed 0 -> 1", ...]``: every key whose value differs (missing keys count)."""
    missing = object()
    return [
        f"{key} {saved.get(key, missing)!r} -> {wanted.get(key, missing)!r}".replace(
            repr(missing), "(unset)"
        )
        for key in sorted(set(saved) | set(wanted))
        if saved.get(key, missing) != wanted.get(key, missing)
    ]


def save_stage(
    path: str | os.PathLike, fingerprint: Mapping[str, Any], epoch: int, **state
) -> Path | None:
    """A stage's resumable state after ``epoch`` epochs (model, optimiser, RNG, history...).

    Under torchrun only rank 0 writes (every process holds the same state, or passes its
    own through ``distributed.per_rank``); the others return ``None``.
    """
    if not distributed.is_main():
        return None
    payload = {
        "format": STAGE_FORMAT,
        "format_version": STAGE_FORMAT_VERSION,
        "fingerprint": dict(fingerprint),
        "epoch": int(epoch),
        **state,
    }
    return atomic_save(payload, path)


# How error messages name each stage's checkpoint.
STAGE_NAMES = {
    "moco": "MoCo",
    "backbone": "backbone",
    "init": "head-init",
    "cdc": "CDC",
    "ruc": "RUC",
}


def load_stage(
    path: str | os.PathLike, fingerprint: Mapping[str, Any], map_location: Any = "cpu"
) -> dict | None:
    """The state saved by :func:`save_stage`, ``None`` if ``path`` does not exist.

    Raises the one CDCError naming what changed when the checkpoint belongs to another
    run (other settings, seed, number of images or processes), and a clear CDCError for
    a file that is not a readable stage checkpoint of this version.
    """
    path = Path(path)
    if not path.exists():
        return None
    what = STAGE_NAMES.get(fingerprint["stage"], fingerprint["stage"])
    try:
        state = safe_load(path, map_location)
    except CDCError as exc:
        raise CDCError(f"{path}: not a readable {what} checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != STAGE_FORMAT:
        raise CDCError(
            f"{path}: not a readable {what} checkpoint (another format, or written by an "
            "older cdc-serve); delete it or train into another --out"
        )
    if state.get("format_version") != STAGE_FORMAT_VERSION:
        raise CDCError(
            f"{path} has checkpoint version {state.get('format_version')!r}; this cdc-serve "
            f"reads version {STAGE_FORMAT_VERSION}: delete it or train into another --out"
        )
    saved = state.get("fingerprint") or {}
    changed = changed_settings(saved, dict(fingerprint))
    if saved.get("world_size", 1) != fingerprint.get("world_size", 1):
        before, now = saved.get("world_size", 1), fingerprint.get("world_size", 1)
        how = "without torchrun" if before == 1 else f"torchrun --nproc-per-node {before}"
        raise CDCError(
            f"cannot resume from {path}: it was written by a run of {before} "
            f"process{'es' if before != 1 else ''}, this one has {now} ({', '.join(changed)}); "
            f"resume with the same number of processes ({how}) or train into another --out"
        )
    if changed:
        raise CDCError(
            f"cannot resume from {path}: it was written with other {what} settings "
            f"({', '.join(changed)}); delete it or train into another --out "
            "(or resume with the same settings)"
        )
    return state


# ----------------------------------------------------------------------------------------------
# model.pth
# ----------------------------------------------------------------------------------------------


def build_model(arch: dict) -> ClusteringModel:
    """An untrained ``ClusteringModel`` of the given architecture (the ``arch`` dict of model.pth)."""
    from cdc_serve_training.backbones import build_backbone

    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise CDCError(f"model architecture lacks {', '.join(missing)}")
    backbone = build_backbone(
        arch["backbone"], int(arch["in_channels"]), tuple(arch["input_size"]),
        arch.get("stem", "auto"), arch.get("input_norm", "dataset"),
    )  # fmt: skip
    if int(backbone.out_dim) != int(arch["feature_dim"]):
        raise CDCError(
            f"backbone {arch['backbone']} gives {backbone.out_dim}-d features, "
            f"the model says {arch['feature_dim']}"
        )
    return ClusteringModel(backbone, int(arch["hidden_dim"]), int(arch["num_classes"]))


def arch_of(model: ClusteringModel, backbone: str, in_channels: int, input_size) -> dict:
    """The ``arch`` dict describing ``model`` (``stem``: the ResNet stem, when not auto;
    ``input_norm``: the backbone's per-image normalisation, when not ``dataset``)."""
    stem = getattr(model.backbone, "stem", "auto")
    input_norm = getattr(model.backbone, "input_norm_mode", "dataset")
    return {
        "backbone": backbone,
        **({"stem": stem} if stem != "auto" else {}),
        **({"input_norm": input_norm} if input_norm != "dataset" else {}),
        "in_channels": int(in_channels),
        "input_size": [int(s) for s in input_size],
        "feature_dim": model.feature_dim,
        "hidden_dim": model.hidden_dim,
        "num_classes": model.num_classes,
    }


def save_model(
    path: str | os.PathLike,
    model: ClusteringModel,
    *,
    method: str,
    arch: dict,
    preprocess: dict,
    config: dict,
    dataset: str,
    metrics: dict,
    ood: dict,
) -> Path:
    """Write ``model.pth`` (format of docs/ARCHITECTURE.md) atomically; returns its path."""
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "project_version": __version__,
        "method": method,
        "arch": dict(arch),
        "preprocess": dict(preprocess),
        "state_dict": state_dict,
        "config": config,
        "dataset": dataset,
        "metrics": metrics,
        "ood": ood,
    }
    return atomic_save(payload, path)


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[ClusteringModel, dict]:
    """Read a ``model.pth``: ``(model in eval mode, everything else of the file)``."""
    payload = safe_load(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CDCError(f"{path} is not a cdc-serve model (expected format {FORMAT!r})")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CDCError(
            f"{path} has model format version {payload.get('format_version')!r}; this "
            f"cdc-serve reads version {FORMAT_VERSION}"
        )
    if _major(payload.get("project_version", "")) != _major(__version__):
        raise CDCError(
            f"{path} was written by cdc-serve {payload.get('project_version')}, "
            f"incompatible with this version {__version__}"
        )
    for key in ("arch", "state_dict", "preprocess"):
        if not isinstance(payload.get(key), dict):
            raise CDCError(f"{path} lacks its {key!r} section")
    arch, state_dict = payload["arch"], payload["state_dict"]
    for head in ("clu_head", "cal_head"):
        weight = state_dict.get(f"{head}.fc2.weight")
        if weight is not None and weight.shape[0] != arch.get("num_classes"):
            raise CDCError(
                f"{path}: the model says {arch.get('num_classes')} classes but the {head} "
                f"weights have {weight.shape[0]}"
            )
    model = build_model(arch)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CDCError(f"{path}: weights do not fit the architecture ({first})") from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing weights {result.missing_keys[:5]}")
        if result.unexpected_keys:
            parts.append(f"unexpected weights {result.unexpected_keys[:5]}")
        raise CDCError(f"{path} does not match its architecture: " + "; ".join(parts))
    model.eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, info
