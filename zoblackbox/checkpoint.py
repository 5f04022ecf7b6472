"""Safe, versioned, atomically written checkpoints.

A checkpoint is a pair of files in a directory:

* ``ckpt-<step>.pt`` -- tensors and plain containers only, written with ``torch.save`` and read
  back with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects;
* ``ckpt-<step>.json`` -- metadata: format name and version, the SHA-256 of the ``.pt`` file, and
  whatever the caller adds (epoch, step, configuration).

``latest.json`` names the newest complete checkpoint. Every file is written to a temporary name
and renamed into place, and ``latest.json`` is replaced last, so a crash at any moment leaves the
previous checkpoint intact and loadable. Rewriting an existing tag writes the new payload under a
name of its own (``ckpt-<step>.<sha>.pt``) and then replaces the metadata that names it in one
rename, so the pair being replaced stays complete until the new one is.
Temporary files left by a writer that was killed are removed by the next save.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import tempfile
import warnings
import zipfile
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
    if isinstance(tag, bool) or not isinstance(tag, int) or tag < 0:
        raise CheckpointError(f"tag must be an int >= 0 (e.g. the step), got {tag!r}")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint state must be a dict of tensors and plain containers, got "
                              f"{type(state).__name__}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata must be a dict, got {type(meta).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} is a file")
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    try:  # refuse to write what could not be loaded safely
        torch.load(io.BytesIO(payload), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint state holds objects that are not plain tensors/containers: {exc}") from exc
    name = f"ckpt-{int(tag):09d}"
    js = directory / f"{name}.json"
    digest = hashlib.sha256(payload).hexdigest()
    previous = _payload_of(js) if js.exists() else None
    # a checkpoint of the same tag again gets a payload file of its own: the old pair stays complete and
    # loadable until the metadata naming the new payload replaces it in one rename (an exception, a full
    # disk or a SIGKILL at any moment leaves the last good checkpoint exactly as it was)
    pt = directory / (f"{name}.pt" if previous is None and not (directory / f"{name}.pt").exists()
                      else f"{name}.{digest[:16]}.pt")
    full_meta = {"format": FORMAT, "version": VERSION, "sha256": digest, "file": pt.name, **meta}
    try:  # everything is validated before the first write: a failure leaves the last good checkpoint as it was
        meta_bytes = json.dumps(full_meta, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata must be JSON (finite numbers, strings, lists, dicts): {exc}") \
            from exc
    _atomic_write(pt, payload)
    _atomic_write(js, meta_bytes)
    _atomic_write(directory / "latest.json", json.dumps({"checkpoint": js.name}).encode())
    if previous is not None and previous != pt:
        previous.unlink(missing_ok=True)
    _prune(directory, keep={js.name, pt.name})
    return pt


def _payload_of(js: Path) -> Path | None:
    """The payload file a checkpoint's metadata names (``None`` when it cannot be read)."""
    try:
        name = json.loads(js.read_text()).get("file")
    except (OSError, ValueError, AttributeError):  # unreadable metadata: its payload is never taken for a stray
        return js.with_suffix(".pt")
    if not isinstance(name, str) or Path(name).name != name or not name.startswith("ckpt-") \
            or not name.endswith(".pt"):
        return js.with_suffix(".pt")
    return js.parent / name


def _prune(directory: Path, keep: set[str]) -> None:
    metas = sorted(directory.glob("ckpt-*.json"))
    for js in metas[:-_KEEP]:
        if js.name in keep:
            continue
        payload = _payload_of(js)
        if payload is not None:
            payload.unlink(missing_ok=True)
        js.unlink(missing_ok=True)
    referenced = {p.name for p in map(_payload_of, directory.glob("ckpt-*.json")) if p is not None} | keep
    for stray in directory.glob("ckpt-*.pt"):  # payloads no metadata names (a writer killed in between)
        if stray.name not in referenced:
            stray.unlink(missing_ok=True)
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
            or tampered file), a payload that is empty, truncated or not a ``torch.save`` file ("is
            corrupt or not a zoblackbox checkpoint"), or a payload holding anything but tensors and
            plain containers ("refusing to load ...: it holds objects other than tensors").
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path} (latest.json missing)")
        path = found
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {str(path)!r}: not found (no such file or directory)")
    js = path.with_suffix(".json")
    if not js.exists():
        raise CheckpointError(f"{str(path)!r} is not a zoblackbox checkpoint: expected a checkpoint directory or a "
                              f"ckpt-*.json / ckpt-*.pt file, and its metadata {js.name} is not there")
    try:
        meta = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{js} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{js} is not a {FORMAT} file (format={meta.get('format') if isinstance(meta, dict) else meta!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{js} has checkpoint format version {meta.get('version')!r}; this zoblackbox reads {VERSION}")
    pt = _payload_of(js) or js.with_suffix(".pt")
    if not pt.exists():
        raise CheckpointError(f"checkpoint payload {pt} not found")
    payload = pt.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != meta.get("sha256"):
        raise CheckpointError(f"{pt} is corrupt: SHA-256 {digest} does not match the recorded {meta.get('sha256')}")
    if not payload:
        raise CheckpointError(f"{pt} is corrupt or not a zoblackbox checkpoint: the file is empty")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol is reported below, not as a torch warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # the unpickler fails in many ways on a payload it cannot read
        holds_objects, reason = _diagnose(payload)
        if holds_objects and isinstance(exc, pickle.UnpicklingError):  # the weights-only unpickler's refusal
            raise CheckpointError(f"refusing to load {pt}: it holds objects other than tensors and plain containers "
                                  f"({type(exc).__name__}: {_short(exc)})") from exc
        raise CheckpointError(f"{pt} is corrupt or not a zoblackbox checkpoint: {reason} "
                              f"({type(exc).__name__}: {_short(exc)})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{pt} is corrupt or not a zoblackbox checkpoint: its payload is a "
                              f"{type(state).__name__}, a zoblackbox checkpoint holds a dict")
    return state, meta


#: pickle opcodes that build or call Python objects (a weights-only load refuses those it does not know)
_OBJECT_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX",
                             "EXT1", "EXT2", "EXT4"})


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _diagnose(payload: bytes) -> tuple[bool, str]:
    """Why ``torch.load(weights_only=True)`` could not read ``payload``, without running it:
    ``(True, ...)`` for a well-formed pickle that references Python objects (the unsafe kind),
    ``(False, reason)`` for anything else (truncated, random bytes, another file format)."""
    data = payload
    if payload[:4] == b"PK\x03\x04":  # torch.save's zip format
        try:
            with zipfile.ZipFile(io.BytesIO(payload)) as archive:
                names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if not names:
                    return False, "a zip archive without the data.pkl of a torch.save file"
                data = archive.read(names[0])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, RuntimeError) as exc:
            return False, f"a damaged or truncated zip archive ({exc})"
    try:
        ops = {op.name for op, _, _ in pickletools.genops(data)}
    except Exception as exc:  # noqa: BLE001 - not a well-formed pickle stream
        return False, f"not a well-formed torch.save payload ({type(exc).__name__}: {exc})"
    if ops & _OBJECT_OPCODES:
        return True, ""
    return False, "a pickle that is not a torch.save payload"


# ------------------------------------------------------------------------------------------ state checks
# Helpers of the ``load_state_dict`` methods: every field of a loaded state is checked against what a run
# could have written, before anything is applied; a failure is a CheckpointError naming the field.
def describe_value(value) -> str:
    """A short description of a state field's value for an error message."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__} ({text[:60]}...)"


def field_error(field: str, value, expected: str) -> CheckpointError:
    """``field <field> is <value>, not <expected>``."""
    return CheckpointError(f"field {field} is {describe_value(value)}, not {expected}")


def field_of(state, key: str, field: str):
    """``state[key]``; a CheckpointError naming ``field`` when the state is not a dict or lacks it."""
    if not isinstance(state, dict):
        raise field_error(field.rpartition(".")[0] or "state", state, "a dict")
    if key not in state:
        raise CheckpointError(f"field {field} is missing")
    return state[key]


def check_int(value, field: str, low: int = 0, high: int | None = None, what: str = "") -> int:
    """An int (not a bool) in ``low..high``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        expected = f"an int >= {low}" if high is None else f"an int >= {low} and <= {high}"
        raise field_error(field, value, expected + (f" ({what})" if what else ""))
    return value


def check_rng_state(value, field: str, reference: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """A random generator's state: a uint8 tensor of the size ``reference`` (a state of this generator) has,
    that a scratch generator on ``device`` accepts (nothing is set on the generator it is for)."""
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.shape == reference.shape):
        raise field_error(field, value, f"a uint8 tensor of shape {tuple(reference.shape)} (a random generator's "
                                        "state)")
    try:
        torch.Generator(device=device).set_state(value)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"field {field} is not a random generator's state: {exc}") from exc
    return value
