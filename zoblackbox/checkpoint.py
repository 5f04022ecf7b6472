"""Safe, versioned, atomically written checkpoints.

A checkpoint is a pair of files in a directory:

* ``ckpt-<step>.pt`` -- tensors and plain containers only, written with ``torch.save`` and read
  back with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects;
* ``ckpt-<step>.json`` -- metadata: format name and version, the SHA-256 of the ``.pt`` file, and
  whatever the caller adds (epoch, step, configuration).

``latest.json`` names the newest complete checkpoint. Every file is written to a temporary name
and renamed into place, and ``latest.json`` is replaced last, so a crash at any moment leaves the
previous checkpoint intact and loadable. Rewriting an existing tag first points ``latest.json`` at
the previous checkpoint, so the pair being replaced is never the one ``latest.json`` names.
Temporary files left by a writer that was killed are removed by the next save.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["FORMAT", "VERSION", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT = "zoblackbox-checkpoint"
VERSION = 1
_KEEP = 2


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], meta: dict[str, Any], *, tag: int) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists and dicts of them) and ``meta`` (JSON).

    Args:
        directory: created if missing.
        state: the payload; anything that ``torch.load(weights_only=True)`` cannot read back is
            rejected here, before anything is written.
        meta: JSON-serializable metadata.
        tag: an increasing integer (e.g. the global step) naming the checkpoint.

    Returns:
        the path of the ``.pt`` file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    try:  # refuse to write what could not be loaded safely
        torch.load(io.BytesIO(payload), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint state holds objects that are not plain tensors/containers: {exc}") from exc
    name = f"ckpt-{int(tag):09d}"
    pt, js = directory / f"{name}.pt", directory / f"{name}.json"
    full_meta = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
                 "file": pt.name, **meta}
    try:  # everything is validated before the first write: a failure leaves the last good checkpoint as it was
        meta_bytes = json.dumps(full_meta, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata must be JSON (finite numbers, strings, lists, dicts): {exc}") \
            from exc
    if js.exists() or pt.exists():  # same tag again: never leave latest.json on a half-replaced pair
        older = [m for m in sorted(directory.glob("ckpt-*.json")) if m.name < js.name]
        if older:  # (with no older checkpoint, a kill in between is reported as a checksum mismatch)
            _atomic_write(directory / "latest.json", json.dumps({"checkpoint": older[-1].name}).encode())
    _atomic_write(pt, payload)
    _atomic_write(js, meta_bytes)
    _atomic_write(directory / "latest.json", json.dumps({"checkpoint": js.name}).encode())
    _prune(directory, keep={js.name, pt.name})
    return pt


def _prune(directory: Path, keep: set[str]) -> None:
    metas = sorted(directory.glob("ckpt-*.json"))
    for js in metas[:-_KEEP]:
        if js.name in keep:
            continue
        js.with_suffix(".pt").unlink(missing_ok=True)
        js.unlink(missing_ok=True)
    for pattern in ("ckpt-*.tmp", "latest.json.*.tmp"):  # left by a writer killed before its rename
        for tmp in directory.glob(pattern):
            tmp.unlink(missing_ok=True)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The metadata file of the newest complete checkpoint in ``directory`` (``None`` if none)."""
    pointer = Path(directory) / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{pointer} is not a zoblackbox checkpoint pointer: {exc!r}") from exc
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{pointer} is not a zoblackbox checkpoint pointer: 'checkpoint' is {name!r}, "
                              "expected a file name")
    if Path(name).name != name:
        raise CheckpointError(f"{pointer} points outside its directory: {name!r}")
    return Path(directory) / name


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[dict, dict]:
    """Load a checkpoint: a directory (its latest checkpoint) or a ``ckpt-*.json``/``.pt`` path.

    Returns:
        ``(state, meta)``.

    Raises:
        CheckpointError: missing files, a foreign or newer format, a checksum mismatch (corrupt
            or tampered file), or a payload holding anything but tensors and plain containers.
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path} (latest.json missing)")
        path = found
    js = path.with_suffix(".json")
    if not js.exists():
        raise CheckpointError(f"checkpoint metadata {js} not found")
    try:
        meta = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{js} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{js} is not a {FORMAT} file (format={meta.get('format') if isinstance(meta, dict) else meta!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{js} has checkpoint format version {meta.get('version')!r}; this zoblackbox reads {VERSION}")
    pt = js.with_suffix(".pt")
    if not pt.exists():
        raise CheckpointError(f"checkpoint payload {pt} not found")
    payload = pt.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != meta.get("sha256"):
        raise CheckpointError(f"{pt} is corrupt: SHA-256 {digest} does not match the recorded {meta.get('sha256')}")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as exc:
        raise CheckpointError(f"refusing to load {pt}: it holds objects other than tensors and plain containers ({exc})") from exc
    except Exception as exc:  # any other failure of the unpickler on a payload it cannot read
        raise CheckpointError(f"{pt} is not a readable checkpoint payload: {type(exc).__name__}: {exc}") from exc
    return state, meta
