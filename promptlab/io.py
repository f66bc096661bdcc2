"""Safe file I/O: atomic writes and strictly checked safetensors reads (never pickle)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load as st_load

# safetensors dtype names and their sizes in bytes
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER = 100 * 1024 * 1024
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host_tag() -> str:
    """This machine's name as it appears in temporary file names (letters, digits, '-' and '_' only)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists here (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete the temporary files that killed writers of ``path`` left behind; return what was removed.

    A temporary file is named ``.<name>.<host>.<pid>.<random>.tmp``. Only files of this target, written on
    this machine by a process that no longer exists, are removed: a live writer's file (another process
    saving the same file right now, or another thread of this one) is never touched, and neither is a file
    from another machine sharing the folder, whose process ids mean nothing here.
    """
    path = Path(path)
    prefix, host = f".{path.name}.", _host_tag()
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        parts = name[len(prefix) : -len(".tmp")].split(".")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if _pid_alive(int(parts[1])):
            continue
        try:
            os.unlink(path.parent / name)
            removed.append(path.parent / name)
        except FileNotFoundError:  # another writer cleaned it first
            pass
        except OSError:
            pass  # cleaning up is a courtesy: it never stops the write
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a half file.

    The bytes go to a temporary file in the same folder, are flushed to disk, then renamed over ``path``.
    On any error (a full disk) the temporary file is removed and the old file is untouched. A kill leaves
    the temporary file behind; its name carries the writer's host and pid, so the next write of the same
    file removes it once that process is gone (`remove_stale_temp_files`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host_tag()}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if type(exc) is OSError:  # e.g. a full disk: say which file, keep the errno
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}; "
                                     f"any previous {path.name} is left unchanged") from exc
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d tensors too
    return h.hexdigest()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of ``tensors`` and string ``metadata``, byte for byte the same for the same content.

    safetensors' own writer emits the metadata in hash order, so two saves of one table could differ. Here
    the header is JSON with sorted keys and no spaces, padded with spaces to a multiple of 8 bytes (as
    safetensors pads it); the tensors follow widest dtype first, then by name, in the machine's (little-endian)
    byte order, with no gaps.
    """
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map strings to strings")
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    # widest dtypes first, then by name: every tensor starts at a multiple of its element size
    for name in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in ST_DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be saved; use one of {sorted(map(str, ST_DTYPES))}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write tensors (moved to CPU, contiguous) with string metadata; the same content gives the
    same bytes (see `safetensors_bytes`)."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def load_safetensors(path: str | Path, error: Callable[[str], Exception]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file after checking its header by hand; every problem raises ``error(message)``.

    Checks: the header length, JSON, known dtypes, integer shapes, offsets that match the shapes, lie in
    the file, and tile the data area without gaps or overlaps (so truncation and bit flips in the header
    are caught before any tensor is built).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc}") from exc
    if len(raw) < 8:
        raise error(f"{path}: file is truncated ({len(raw)} bytes): not a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER or 8 + n > len(raw):
        raise error(f"{path}: header length {n} does not fit the file ({len(raw)} bytes): truncated or corrupt")
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: the header is not valid JSON ({exc}): corrupt file") from exc
    if not isinstance(header, dict):
        raise error(f"{path}: the header is not a JSON object: corrupt file")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{path}: the metadata is not a string mapping: corrupt file")
    data_len = len(raw) - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise error(f"{path}: tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise error(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise error(f"{path}: tensor {name!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise error(f"{path}: tensor {name!r} has malformed data offsets {offsets!r}")
        size = DTYPE_SIZES[dtype]
        for d in shape:
            size *= d
        if offsets[1] - offsets[0] != size or offsets[0] < 0 or offsets[1] > data_len:
            raise error(f"{path}: tensor {name!r} offsets {offsets} do not match its shape {shape} and dtype "
                        f"{dtype} within {data_len} data bytes: truncated or corrupt")
        spans.append(tuple(offsets))
    spans.sort()
    end = 0
    for a, b in spans:
        if a != end:
            raise error(f"{path}: tensor data overlaps or leaves gaps: corrupt file")
        end = b
    if end != data_len:
        raise error(f"{path}: {data_len - end} bytes of data belong to no tensor: corrupt or tampered file")
    try:
        tensors = st_load(raw)
    except Exception as exc:  # safetensors raises its own error type
        raise error(f"{path}: cannot decode tensors: {exc}") from exc
    return tensors, metadata


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_checksummed(path: str | Path, tensors: dict[str, torch.Tensor], key: str, meta: dict) -> None:
    """Write tensors with ``meta`` as JSON under metadata ``key``, checksummed by its sha256 under ``key_sha256``."""
    text = json.dumps(meta, sort_keys=True)
    save_safetensors(path, tensors, {key: text, f"{key}_sha256": text_sha256(text)})


def load_checksummed(path: str | Path, key: str, error: Callable[[str], Exception],
                what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by `save_checksummed`; a missing, edited or unparsable metadata raises ``error``.

    The metadata carries the templates, settings and tensor checksums: a flipped byte there must not load.
    """
    tensors, raw = load_safetensors(path, error)
    text = raw.get(key)
    if text is None:
        raise error(f"{path}: no {key} metadata: not a {what}")
    if raw.get(f"{key}_sha256") != text_sha256(text):
        raise error(f"{path}: the metadata does not match its sha256 ({key}_sha256 missing or different): "
                    f"corrupt or edited file")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error(f"{path}: metadata is not valid JSON ({exc}): not a {what}") from exc
    if not isinstance(meta, dict):
        raise error(f"{path}: metadata is not a JSON object: not a {what}")
    return tensors, meta


def check_tensor_sums(path: str | Path, tensors: dict[str, torch.Tensor], sums, error: Callable[[str], Exception]) -> None:
    """Every tensor is listed in ``sums`` (name -> sha256) and matches it; nothing else is listed."""
    if not isinstance(sums, dict):
        raise error(f"{path}: no tensor checksums in the metadata: corrupt, edited, or written by an older "
                    f"promptlab")
    if set(sums) != set(tensors):
        raise error(f"{path}: tensors and metadata disagree (unknown {sorted(set(tensors) - set(sums))}, "
                    f"missing {sorted(set(sums) - set(tensors))}): corrupt file")
    for k, t in tensors.items():
        if tensor_sha256(t) != sums[k]:
            raise error(f"{path}: tensor {k!r} does not match its recorded sha256: corrupt file")


def check_same_layout(where, what: str, expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor],
                      error: Callable[[str], Exception]) -> None:
    """``saved`` has exactly the names, shapes and dtypes of ``expected``, or ``error`` names the difference."""
    if set(expected) != set(saved):
        raise error(f"{where}: {what} do not match the model: unexpected {sorted(set(saved) - set(expected))}, "
                    f"missing {sorted(set(expected) - set(saved))}")
    for k, v in expected.items():
        if v.shape != saved[k].shape or v.dtype != saved[k].dtype:
            raise error(f"{where}: {what} {k!r} is {tuple(saved[k].shape)} {saved[k].dtype}, "
                        f"expected {tuple(v.shape)} {v.dtype}")
