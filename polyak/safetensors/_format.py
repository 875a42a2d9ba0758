"""The safetensors file format: dtype codes and strict header parsing.

Layout: an unsigned little-endian 64-bit header length ``n``, ``n`` bytes of UTF-8 JSON, then
the data buffer. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets"}``, with
offsets relative to the start of the data buffer, plus an optional ``"__metadata__"`` map of
strings. Parsing checks everything before a single data byte is read, so a hostile or truncated
file can neither cause a large allocation nor an out-of-bounds read: the header length is bounded
and checked against the file size before it is read, and every tensor must fit the data buffer,
which the tensors must tile exactly (contiguous, non-overlapping, no trailing bytes), as the
official reader requires.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import ml_dtypes
import numpy as np

from polyak.safetensors._errors import HeaderError

__all__ = [
    "MAX_HEADER_BYTES",
    "DTYPES",
    "TensorInfo",
    "Header",
    "dtype_code",
    "parse_header",
    "encode_header",
    "pread_into",
    "PACKED",
    "storage_nbytes",
    "pack_f4",
    "unpack_f4",
]

MAX_HEADER_BYTES = 100_000_000

# safetensors stores little-endian data; "<" keeps that explicit for the multi-byte types.
DTYPES: Mapping[str, np.dtype] = MappingProxyType(
    {
        "BOOL": np.dtype(np.bool_),
        "U8": np.dtype("<u1"),
        "I8": np.dtype("<i1"),
        "U16": np.dtype("<u2"),
        "I16": np.dtype("<i2"),
        "U32": np.dtype("<u4"),
        "I32": np.dtype("<i4"),
        "U64": np.dtype("<u8"),
        "I64": np.dtype("<i8"),
        "F16": np.dtype("<f2"),
        "F32": np.dtype("<f4"),
        "F64": np.dtype("<f8"),
        "BF16": np.dtype(ml_dtypes.bfloat16),
        "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
        "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
        "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
        "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
        "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
        "F4": np.dtype(ml_dtypes.float4_e2m1fn),
        "C64": np.dtype("<c8"),
    }
)
# F4 is stored packed, two values per byte, the first in the low nibble (as torch's
# float4_e2m1fn_x2 and the OCP MX layout); shapes count values, as the official library does.
# ml_dtypes holds one value per byte, so readers unpack and writers pack.
PACKED = frozenset({"F4"})
_CODES = {dt: code for code, dt in DTYPES.items()}
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def dtype_code(dtype: Any, where: str = "") -> str:
    """The safetensors dtype code ("F32", "BF16", ...) of a numpy dtype; HeaderError if none."""
    dt = np.dtype(dtype)
    code = _CODES.get(dt.newbyteorder("<") if dt.byteorder == ">" else dt)
    if code is None:
        raise HeaderError(
            f"{where}dtype {dt} cannot be stored in safetensors; "
            f"supported: {', '.join(str(d) for d in DTYPES.values())}"
        )
    return code


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (``start`` is an absolute file offset)."""

    name: str
    code: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order, the metadata, and where data begins."""

    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] | None
    data_start: int


def pread_into(fd: int, buf: memoryview, offset: int, path: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (position-independent, so safe across threads)."""
    while buf.nbytes:
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise HeaderError(
                f"{path}: unexpected end of file at byte {offset} "
                "(the file is truncated or was changed while being read)"
            )
        buf = buf[n:]
        offset += n


def storage_nbytes(dtype: Any, numel: int) -> int:
    """Bytes ``numel`` values of ``dtype`` take in a safetensors file (F4 packs two per byte)."""
    dt = np.dtype(dtype)
    if _CODES.get(dt) in PACKED:
        return (numel + 1) // 2
    return numel * dt.itemsize


def pack_f4(values: np.ndarray) -> np.ndarray:
    """Pack float4_e2m1fn values into bytes, the first in the low nibble."""
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    if raw.size % 2:  # only a tensor's odd tail, which parse_header refuses to read back
        raw = np.append(raw, np.uint8(0))
    return (raw[0::2] & 0x0F) | ((raw[1::2] & 0x0F) << 4)


def unpack_f4(packed: np.ndarray, out: np.ndarray) -> None:
    """Unpack bytes into ``out`` (float4_e2m1fn, ``2 * packed.size`` values)."""
    raw = out.reshape(-1).view(np.uint8)
    np.bitwise_and(packed, 0x0F, out=raw[0::2])
    np.right_shift(packed, 4, out=raw[1::2])


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"duplicate key {key!r} in the JSON header")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(fd: int, path: str, file_size: int) -> Header:
    """Read and validate the header of the safetensors file open as ``fd``.

    Raises:
        HeaderError: naming ``path`` (and the tensor) for any malformed or inconsistent header.
    """
    if file_size < 8:
        raise HeaderError(
            f"{path}: file is {file_size} bytes, too small for a safetensors file "
            "(it needs at least an 8-byte header length)"
        )
    raw = bytearray(8)
    pread_into(fd, memoryview(raw), 0, path)
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES:
        raise HeaderError(
            f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
            "(not a safetensors file, or a corrupt one)"
        )
    if n > file_size - 8:
        raise HeaderError(
            f"{path}: header length {n} runs past the end of the {file_size}-byte file "
            "(truncated or not a safetensors file)"
        )
    if n < 2:
        raise HeaderError(f"{path}: header length {n} is too short for a JSON object")
    text_bytes = bytearray(n)
    pread_into(fd, memoryview(text_bytes), 8, path)
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(
            f"{path}: header is not valid UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    if not text.startswith("{"):
        raise HeaderError(f"{path}: header does not start with '{{' (not a safetensors file)")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except HeaderError as e:
        raise HeaderError(f"{path}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{path}: header is not a JSON object")
    data_start = 8 + n
    data_len = file_size - data_start
    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()
        ):
            raise HeaderError(f"{path}: '__metadata__' must be a map of strings to strings")
    spans: list[tuple[int, int, str]] = []
    infos: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
            raise HeaderError(
                f"{where}: entry must be an object with exactly the keys "
                f"'dtype', 'shape', 'data_offsets', got {_short(entry)}"
            )
        code = entry["dtype"]
        if not isinstance(code, str) or code not in DTYPES:
            raise HeaderError(
                f"{where}: unknown or unsupported dtype {_short(code)} "
                f"(supported: {', '.join(DTYPES)})"
            )
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise HeaderError(
                f"{where}: shape must be a list of non-negative integers, got {_short(shape)}"
            )
        offsets = entry["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
        ):
            raise HeaderError(
                f"{where}: data_offsets must be [begin, end] integers, got {_short(offsets)}"
            )
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise HeaderError(
                f"{where}: data_offsets [{begin}, {end}] fall outside the {data_len}-byte data "
                "buffer (the file is truncated or corrupt)"
            )
        dtype = DTYPES[code]
        # Python ints cannot overflow, so a hostile shape cannot wrap around to match.
        nbytes = storage_nbytes(dtype, math.prod(shape))
        if code in PACKED and math.prod(shape) % 2:
            raise HeaderError(
                f"{where}: {code} packs two values per byte, but shape {shape} holds an odd "
                f"number of values ({math.prod(shape)})"
            )
        if nbytes != end - begin:
            raise HeaderError(
                f"{where}: shape {shape} of {code} needs {nbytes} bytes but data_offsets "
                f"[{begin}, {end}] hold {end - begin}"
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, code, dtype, tuple(shape), data_start + begin, nbytes)
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            problem = (
                "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            )
            raise HeaderError(
                f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] {problem} "
                f"(expected it to start at {cursor}); tensors must be contiguous"
            )
        cursor = end
    if cursor != data_len:
        raise HeaderError(
            f"{path}: tensors cover {cursor} bytes but the data buffer holds {data_len} "
            "(trailing bytes or a truncated header)"
        )
    ordered = {name: infos[name] for _, _, name in spans}
    meta = MappingProxyType(dict(metadata)) if metadata is not None else None
    return Header(MappingProxyType(ordered), meta, data_start)


def _short(x: Any, limit: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[int]]:
    """Encode a header for ``entries`` (name, dtype code, shape) laid out in the given order.

    Returns:
        The bytes to write at offset 0 (length prefix, JSON padded with spaces so the data
        starts 8-byte aligned, as the official writer does) and each tensor's absolute offset.
    """
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    rel: list[int] = []
    cursor = 0
    for name, code, shape in entries:
        nbytes = storage_nbytes(DTYPES[code], math.prod(shape))
        obj[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [cursor, cursor + nbytes],
        }
        rel.append(cursor)
        cursor += nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    return head, [len(head) + r for r in rel]
