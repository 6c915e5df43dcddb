"""A folder of images -> one uint8 ``N x C x H x W`` array: streaming, parallel, cached.

This is how ``cdc-serve train --dataset imagefolder:DIR`` reads a user's photos, of any
number and size, in bounded memory:

1. **List** the image files (sorted). With sub-folders, each sub-folder is a class, and
   its index a label used for evaluation only; otherwise the folder is one unlabelled set.
2. **Cache key**: a hash of every file's relative path, size and modification time, the
   target size and channels. If ``cache_dir`` holds an array under that key, it is
   memory-mapped and steps 3-5 are skipped: a second run does not decode again, and a
   changed, added or removed file makes a new key.
3. **Header pass** (only when ``channels`` is not given): each file is opened without
   decoding; the channel count is 1 when every readable image is grayscale, else 3.
4. **Decode pass**, in worker processes: each image is decoded (a JPEG at reduced scale,
   ``Image.draft``, when the target is much smaller), converted, resized and written
   straight into a preallocated, memory-mapped uint8 array. Nothing full-size outlives
   its own decode.
5. **Skipped files** (empty, truncated, not an image, an unsupported mode, larger than
   the decompression-bomb limit) are left out with their reason: the rows of the array
   are compacted in place. ``strict=True`` makes the first one an error instead.

The result (:class:`FolderImages`) carries the array, the sources in order, the labels
(or ``None``), the class names and the skipped files. Only numpy and Pillow are needed.

``cdc-serve predict`` decodes its stream of files on the same kind of workers
(:class:`cdc_serve.decode_pool.DecodePool`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cdc_serve import CDCError, usable_cores
from cdc_serve.preprocess import IMAGE_SUFFIXES, MAX_PIXELS, load_image

CACHE_VERSION = 2  # 2: colour JPEGs for one channel decode to their luma (preprocess.load_image)
CHUNK = 32  # images per task handed to a worker

# Libraries whose threads a forked worker would inherit half-alive (see _pool).
THREADED = ("torch", "onnxruntime", "grpc", "ray", "tritonclient")

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass
class FolderImages:
    """The images of a folder at one size, with where each came from."""

    images: np.ndarray  # uint8 N x C x H x W (memory-mapped)
    sources: list[str]  # the file of each row, relative to the folder
    labels: np.ndarray | None  # the sub-folder index of each row, or None (unlabelled)
    class_names: list[str] | None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    cached: bool = False  # True when the array came from the cache, not from decoding


# ----------------------------------------------------------------------------------------------
# 1. Listing and 2. the cache key
# ----------------------------------------------------------------------------------------------


def list_images(folder: Path) -> tuple[list[Path], np.ndarray | None, list[str] | None]:
    """The image files of ``folder`` (sorted), their sub-folder labels and the class names."""
    if not folder.is_dir():
        raise CDCError(f"image folder {folder} does not exist or is not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def images_in(d: Path, recursive: bool) -> list[Path]:
        found = d.rglob("*") if recursive else d.iterdir()
        return sorted(f for f in found if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())

    if classes:
        files, labels = [], []
        for i, name in enumerate(classes):
            inside = images_in(folder / name, recursive=True)
            files += inside
            labels += [i] * len(inside)
        label_array = np.asarray(labels, dtype=np.int64)
    else:
        files, label_array = images_in(folder, recursive=False), None
    if not files:
        raise CDCError(
            f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "point --dataset imagefolder:DIR at the folder of your images"
        )
    return files, label_array, classes or None


def most_common_size(files: list[Path]) -> tuple[int, int]:
    """The (H, W) most of the readable ``files`` have, from their headers (no decoding)."""
    from collections import Counter

    from PIL import Image

    sizes: Counter = Counter()
    for f in files:
        try:
            with Image.open(f) as img:
                sizes[(img.size[1], img.size[0])] += 1
        except Exception:  # noqa: BLE001  unreadable: the read itself reports it
            continue
    if not sizes:
        raise CDCError(f"image folder {files[0].parent}: none of its files is a readable image")
    return sizes.most_common(1)[0][0]


def cache_key(folder: Path, files: list[Path], size: tuple[int, int], channels: int | None) -> str:
    """A hash of the file list (relative path, size, modification time) and the target."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {size} {channels}".encode())
    for f in files:
        try:
            stat = f.stat()
            digest.update(f"{f.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{f.relative_to(folder)}\0missing\n".encode())
    return digest.hexdigest()[:20]


# ----------------------------------------------------------------------------------------------
# 3. and 4. The workers' two jobs
# ----------------------------------------------------------------------------------------------

_target: dict = {}  # a worker's memory-mapped output array and target size


def _start_worker(path: str, shape: tuple[int, ...], max_pixels: int) -> None:
    _target["images"] = np.lib.format.open_memmap(path, mode="r+") if path else None
    _target["shape"], _target["max_pixels"] = shape, max_pixels


def _modes(files: list[str]) -> list[tuple[str | None, str | None]]:
    """Header pass: (mode, None) per readable file, (None, reason) per unreadable one."""
    from PIL import Image

    out = []
    for f in files:
        try:
            if os.path.getsize(f) == 0:
                raise CDCError("empty file (0 bytes)")
            with Image.open(f) as img:
                if img.size[0] * img.size[1] > _target["max_pixels"]:
                    raise CDCError(f"image too large ({img.size[0]} x {img.size[1]} pixels)")
                out.append((img.mode, None))
        except CDCError as exc:
            out.append((None, str(exc)))
        except Exception as exc:  # noqa: BLE001  Pillow fails in many ways on junk
            out.append((None, f"not an image ({type(exc).__name__}: {exc})"))
    return out


def _decode(task: tuple[int, list[str | None]]) -> list[str | None]:
    """Decode pass: write rows ``start..`` of the array; per file None or a reason.

    A file given as None (skipped by the header pass) is left alone."""
    start, files = task
    images = _target["images"]
    _, channels, height, width = _target["shape"]
    out: list[str | None] = []
    for i, f in enumerate(files):
        if f is None:
            out.append(None)
            continue
        try:
            images[start + i] = load_image(f, channels, (height, width), _target["max_pixels"])
            out.append(None)
        except CDCError as exc:
            out.append(str(exc).removeprefix(f"{f}: "))
        except Exception as exc:  # noqa: BLE001  never let one odd file stop the others
            out.append(f"cannot read ({type(exc).__name__}: {exc})")
    return out


def pool_context():
    """The multiprocessing context for worker processes.

    On Linux the workers are forked: from this process when no library that runs its own
    threads is loaded (:data:`THREADED`), else from a fork server (a forked copy of
    onnxruntime's or torch's thread pools, or of gRPC's, can hang), which starts once per
    process with this module preloaded. Elsewhere they are spawned (a script calling
    this then needs the usual ``if __name__ == "__main__":`` guard).
    """
    if not sys.platform.startswith("linux"):
        method = "spawn"
    elif not any(name in sys.modules for name in THREADED):
        method = "fork"
    else:
        method = "forkserver"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])
    return context


def _pool(workers: int, initargs: tuple):
    """``workers`` processes (:func:`pool_context`), or None for 1 (the work then runs in
    this process)."""
    if workers <= 1:
        _start_worker(*initargs)
        return None
    return pool_context().Pool(workers, initializer=_start_worker, initargs=initargs)


def _run(pool, func, tasks: list, progress: bool, what: str, total: int) -> list:
    """``func`` over ``tasks`` (in order) on the pool, with a progress bar of images/s."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=what, unit="img", disable=None if progress else True,
               file=sys.stderr, leave=False)  # fmt: skip
    results = []
    mapped = pool.imap(func, tasks) if pool is not None else map(func, tasks)
    for result in mapped:
        results.append(result)
        bar.update(len(result))
    bar.close()
    return results


# ----------------------------------------------------------------------------------------------
# The whole read
# ----------------------------------------------------------------------------------------------


def read_image_folder(
    folder: str | os.PathLike,
    size: tuple[int, int],
    *,
    channels: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    strict: bool = False,
    progress: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> FolderImages:
    """Read ``folder`` as uint8 ``N x C x H x W`` images of ``size`` (H, W); see the module doc.

    ``channels`` 1 or 3 (None: 1 when every image is grayscale, else 3); ``cache_dir``
    keeps the decoded array (memory-mapped) for the next run, None reads it into memory;
    ``workers`` decoding processes (default: the machine's cores).
    """
    folder = Path(folder).expanduser()
    if channels not in (None, 1, 3):
        raise CDCError(f"--channels must be 1 or 3, got {channels}")
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise CDCError(f"the input size must be positive, got {height}x{width}")
    files, labels, class_names = list_images(folder)
    key = cache_key(folder, files, (height, width), channels)
    cached = _load_cache(cache_dir, key, labels, class_names)
    if cached is not None:
        return cached
    workers = max(1, min(workers or usable_cores(), len(files) // CHUNK + 1))
    started = time.perf_counter()
    skipped: dict[int, str] = {}
    names = [str(f) for f in files]
    chunks = [(s, names[s : s + CHUNK]) for s in range(0, len(names), CHUNK)]

    if channels is None:  # 3. the header pass decides the channel count
        pool = _pool(workers, ("", (), max_pixels))
        try:
            modes = [m for part in _run(pool, _modes, [c for _, c in chunks], progress,
                                         "scan", len(names)) for m in part]  # fmt: skip
        finally:
            if pool is not None:
                pool.close()
        skipped.update({i: reason for i, (_, reason) in enumerate(modes) if reason})
        _check_strict(strict, skipped, files)
        readable = [mode for mode, _ in modes if mode is not None]
        channels = 1 if readable and all(m in GRAY_MODES for m in readable) else 3

    shape = (len(files), channels, height, width)
    out_dir = Path(cache_dir) if cache_dir is not None else None
    path = _array_path(out_dir, key)
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    del images  # the workers write through their own mappings
    pool = _pool(workers, (str(path), shape, max_pixels))
    try:
        todo = [
            (s, [f if s + i not in skipped else None for i, f in enumerate(c)]) for s, c in chunks
        ]
        reasons = _run(pool, _decode, todo, progress, "decode", len(names))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for (s, _), part in zip(chunks, reasons, strict=True):
        skipped.update({s + i: r for i, r in enumerate(part) if r is not None})
    _check_strict(strict, skipped, files)
    if len(skipped) == len(files):
        raise CDCError(
            f"image folder {folder}: none of its {len(files)} files is a readable image "
            f"(first: {files[0].name}: {skipped[0]})"
        )
    keep = np.asarray([i for i in range(len(files)) if i not in skipped], dtype=np.int64)
    images = _compact(path, keep)
    result = FolderImages(
        images=images,
        sources=[str(files[i].relative_to(folder)) for i in keep],
        labels=None if labels is None else labels[keep],
        class_names=class_names,
        skipped=[(str(files[i].relative_to(folder)), skipped[i]) for i in sorted(skipped)],
    )
    if out_dir is None:  # no cache wanted: the array into memory, the temporary file away
        result.images = np.array(result.images)
        _remove(path)
        path.parent.rmdir()
    else:
        _save_cache(path, result, keep, time.perf_counter() - started)
    return result


def _remove(path: Path) -> None:
    for f in (path, path.with_suffix(".json")):
        f.unlink(missing_ok=True)


def _check_strict(strict: bool, skipped: dict[int, str], files: list[Path]) -> None:
    """With ``strict``, the first skipped file as the one error."""
    if strict and skipped:
        first = min(skipped)
        raise CDCError(
            f"{files[first]}: {skipped[first]} (--strict: remove the file, or train without "
            "--strict to skip unreadable files)"
        )


def _compact(path: Path, keep: np.ndarray) -> np.ndarray:
    """The array without the skipped rows, moved down in place; opened copy-on-write."""
    images = np.lib.format.open_memmap(path, mode="r+")
    if len(keep) < images.shape[0]:
        for row, source in enumerate(keep):
            if row != source:
                images[row] = images[source]
        images.flush()
        shape = (len(keep), *images.shape[1:])
        del images
        _truncate(path, shape)
    return np.load(path, mmap_mode="c")


def _truncate(path: Path, shape: tuple[int, ...]) -> None:
    """Rewrite the .npy header for ``shape`` and cut the file after its last row."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        _, fortran, dtype = np.lib.format._read_array_header(f, version)  # noqa: SLF001
        f.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran,
                  "shape": shape}  # fmt: skip
        np.lib.format._write_array_header(f, header, version)  # noqa: SLF001
        offset = f.tell()
        f.truncate(offset + int(np.prod(shape)) * dtype.itemsize)


# ----------------------------------------------------------------------------------------------
# The cache: <cache_dir>/images-<key>.npy and its sidecar .json
# ----------------------------------------------------------------------------------------------


def _array_path(cache_dir: Path | None, key: str) -> Path:
    if cache_dir is None:
        import tempfile

        cache_dir = Path(tempfile.mkdtemp(prefix="cdc-serve-images-"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir / f"images-{key}.npy"


def _save_cache(path: Path, result: FolderImages, keep: np.ndarray, seconds: float) -> None:
    """The sidecar of the array at ``path``: what a later run needs besides the pixels."""
    sidecar = {
        "version": CACHE_VERSION,
        "shape": list(result.images.shape),
        "sources": result.sources,
        "rows": keep.tolist(),  # the listing index of each row
        "skipped": result.skipped,
        "decode_seconds": round(seconds, 2),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sidecar))
    os.replace(tmp, path.with_suffix(".json"))  # the sidecar last: it marks the cache complete
    for stale in path.parent.glob("images-*.npy"):  # arrays of earlier listings
        if stale != path:
            _remove(stale)


def _load_cache(cache_dir, key: str, labels, class_names) -> FolderImages | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"images-{key}.npy"
    try:
        sidecar = json.loads(path.with_suffix(".json").read_text())
        images = np.load(path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    if sidecar.get("version") != CACHE_VERSION or list(images.shape) != sidecar.get("shape"):
        return None
    skipped = [(str(f), str(reason)) for f, reason in sidecar["skipped"]]
    if labels is not None:  # the same listing (same key): the labels of the kept rows
        labels = labels[np.asarray(sidecar["rows"], dtype=np.int64)]
    return FolderImages(images, sidecar["sources"], labels, class_names, skipped, cached=True)
