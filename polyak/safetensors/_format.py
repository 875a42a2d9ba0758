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
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

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
    "Closing",
    "FdReader",
    "PACKED",
    "storage_nbytes",
    "pack_f4",
    "unpack_f4",
    "check_shape",
    "lone_surrogate",
    "TensorTable",
    "MAX_DIMS",
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
# Row numbers of the dtype codes, for the compact per-tensor arrays of TensorTable.
_CODE_LIST = tuple(DTYPES)
_CODE_ROW = {code: i for i, code in enumerate(_CODE_LIST)}


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


# numpy's limits, which the arrays this package reads into must respect (the official reader,
# framework="np", fails on the same shapes, with a bare numpy ValueError).
MAX_DIMS = 64
_U64_MAX = 2**64 - 1
_INTP_MAX = 2**63 - 1


def check_shape(shape: tuple[int, ...] | list[int], itemsize: int) -> str | None:
    """Why ``shape`` of ``itemsize``-byte elements cannot be stored or read, or None if it can.

    Mirrors the official reader: the element count is multiplied left to right in unsigned
    64 bits and an overflow is an error, even when a later dimension is 0; and numpy's limits
    (64 dimensions, a byte size of the non-zero dimensions within ``2**63 - 1``) apply on top.
    """
    if len(shape) > MAX_DIMS:
        return f"shape has {len(shape)} dimensions; at most {MAX_DIMS} are supported"
    count = 1
    nonzero = 1
    for d in shape:
        count *= d
        if count > _U64_MAX:
            return f"shape {list(shape)} overflows 64 bits when multiplied out"
        nonzero *= d or 1
    if count * itemsize > _U64_MAX:
        return f"shape {list(shape)} overflows 64 bits when multiplied out"
    if nonzero * itemsize > _INTP_MAX:
        return f"shape {list(shape)} is too large for an array (numpy's 2**63-byte limit)"
    return None


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


class TensorTable(Mapping[str, TensorInfo]):
    """``name -> TensorInfo`` in file order, stored compactly.

    A merge holds one table per input, and checkpoints can have 10**5 tensors or more: one
    Python object per tensor and input cost about 500 bytes each, so the rows live in numpy
    arrays instead (and names are interned, shared by every input that has them); a
    :class:`TensorInfo` is built only when one is looked up.
    """

    __slots__ = ("_names", "_row", "_codes", "_starts", "_nbytes", "_dims", "_dim_ptr")

    def __init__(
        self,
        names: list[str],
        codes: np.ndarray,
        starts: np.ndarray,
        nbytes: np.ndarray,
        shapes: list[list[int]],
    ) -> None:
        self._names = names
        self._row = {name: i for i, name in enumerate(names)}
        self._codes = codes
        self._starts = starts
        self._nbytes = nbytes
        ndims = np.fromiter((len(s) for s in shapes), np.int64, len(shapes))
        self._dim_ptr = np.zeros(len(shapes) + 1, np.int64)
        np.cumsum(ndims, out=self._dim_ptr[1:])
        # Dimensions fit uint64 (check_shape); a zero-size tensor may have one above 2**63.
        self._dims = np.fromiter((d for s in shapes for d in s), np.uint64, int(self._dim_ptr[-1]))

    def __getitem__(self, name: str) -> TensorInfo:
        i = self._row[name]
        code = _CODE_LIST[self._codes[i]]
        lo, hi = self._dim_ptr[i], self._dim_ptr[i + 1]
        shape = tuple(int(d) for d in self._dims[lo:hi])
        return TensorInfo(
            name, code, DTYPES[code], shape, int(self._starts[i]), int(self._nbytes[i])
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._row


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order, the metadata, and where data begins."""

    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] | None
    data_start: int


_ReaderT = TypeVar("_ReaderT", bound="Closing")


class Closing:
    """``with reader:`` closes the reader at the end of the block: the context-manager half
    that every checkpoint reader shares. Subclasses define :meth:`close`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _ReaderT) -> _ReaderT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FdReader(Closing):
    """A reader owning one open file descriptor ``_fd`` (-1 once closed), closed by
    :meth:`close`, by ``with`` and by garbage collection."""

    _fd = -1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


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


def lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone UTF-16 surrogate (from a JSON escape such as ``\\ud800``).

    Python's json module accepts them, but such a string is not Unicode: the official reader
    rejects the header, and encoding the name again (to print or write it) would fail.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_surrogates(obj: dict[str, Any], metadata: Any, path: str) -> None:
    strings = [(k, "tensor name") for k in obj]
    strings += [(e.get("dtype"), "dtype") for e in obj.values() if isinstance(e, dict)]
    if isinstance(metadata, dict):
        strings += [(s, "__metadata__") for kv in metadata.items() for s in kv]
    for s, what in strings:
        if isinstance(s, str) and lone_surrogate(s):
            raise HeaderError(
                f"{path}: header has a lone UTF-16 surrogate escape in a {what} "
                f"({s.encode('utf-8', 'backslashreplace').decode('ascii', 'replace')!r:.80}); "
                "it is not valid Unicode, and the official reader rejects it too"
            )


def _read_json(fd: int, path: str, file_size: int) -> tuple[dict[str, Any], int]:
    """The header's JSON object and the header length, read with every bound checked."""
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
    del text_bytes
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
    if "\\ud" in text or "\\uD" in text:  # only then can a lone surrogate be there
        _check_surrogates(obj, obj.get("__metadata__"), path)
    return obj, n


def _check_entry(where: str, entry: Any, data_len: int) -> tuple[int, list[int], int, int]:
    """(dtype row, shape, begin, end) of one tensor entry, validated."""
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
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
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
    problem = check_shape(shape, dtype.itemsize)
    if problem is not None:
        raise HeaderError(f"{where}: {problem}")
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
    return _CODE_ROW[code], shape, begin, end


def _check_tiling(
    path: str, names: list[str], begins: np.ndarray, ends: np.ndarray, data_len: int
) -> np.ndarray:
    """The file order of the tensors, checking that they tile the data buffer exactly."""
    order = np.argsort(begins, kind="stable")
    b, e = begins[order], ends[order]
    expected = np.concatenate(([0], e[:-1])) if len(e) else e
    bad = np.flatnonzero(b != expected)
    if len(bad):
        i = int(bad[0])
        begin, end, cursor = int(b[i]), int(e[i]), int(expected[i])
        problem = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
        raise HeaderError(
            f"{path}: tensor {names[order[i]]!r}: data_offsets [{begin}, {end}] {problem} "
            f"(expected it to start at {cursor}); tensors must be contiguous"
        )
    cursor = int(e[-1]) if len(e) else 0
    if cursor != data_len:
        raise HeaderError(
            f"{path}: tensors cover {cursor} bytes but the data buffer holds {data_len} "
            "(trailing bytes or a truncated header)"
        )
    return order


def parse_header(fd: int, path: str, file_size: int) -> Header:
    """Read and validate the header of the safetensors file open as ``fd``.

    Raises:
        HeaderError: naming ``path`` (and the tensor) for any malformed or inconsistent header.
    """
    obj, n = _read_json(fd, path, file_size)
    data_start = 8 + n
    data_len = file_size - data_start
    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()
        ):
            raise HeaderError(f"{path}: '__metadata__' must be a map of strings to strings")
    count = len(obj)
    names: list[str] = []
    shapes: list[list[int]] = []
    codes = np.empty(count, np.uint8)
    begins = np.empty(count, np.int64)
    ends = np.empty(count, np.int64)
    for i, (name, entry) in enumerate(obj.items()):
        row, shape, begins[i], ends[i] = _check_entry(f"{path}: tensor {name!r}", entry, data_len)
        codes[i] = row
        names.append(sys.intern(name))  # shared by every input with the same names
        shapes.append(shape)
    del obj
    order = _check_tiling(path, names, begins, ends, data_len)
    table = TensorTable(
        [names[i] for i in order],
        codes[order],
        begins[order] + data_start,
        ends[order] - begins[order],
        [shapes[i] for i in order],
    )
    meta = MappingProxyType(dict(metadata)) if metadata is not None else None
    return Header(table, meta, data_start)


def _short(x: Any, limit: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[int]]:
    """Encode a header for ``entries`` (name, dtype code, shape) laid out in the given order.

    Raises:
        HeaderError: a shape no reader could load (:func:`check_shape`), a name that is not
            valid Unicode, or a header over :data:`MAX_HEADER_BYTES`: refused before any write.

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
        problem = check_shape(shape, DTYPES[code].itemsize)
        if problem is not None:
            raise HeaderError(f"tensor {name!r}: {problem}; it cannot be written")
        nbytes = storage_nbytes(DTYPES[code], math.prod(shape))
        obj[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [cursor, cursor + nbytes],
        }
        rel.append(cursor)
        cursor += nbytes
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        texts = [*obj, *(s for kv in (metadata or {}).items() for s in kv)]
        bad = next(t for t in texts if lone_surrogate(t))
        raise HeaderError(
            f"a tensor name or metadata string holds a lone UTF-16 surrogate "
            f"({bad!r:.80}); it is not valid Unicode and cannot be written"
        ) from None
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_BYTES:
        raise HeaderError(
            f"the header would be {len(text)} bytes ({len(entries)} tensors), over the "
            f"{MAX_HEADER_BYTES}-byte limit of safetensors readers; write a sharded folder "
            "(max_shard_size) or fewer tensors and less metadata"
        )
    head = struct.pack("<Q", len(text)) + text
    return head, [len(head) + r for r in rel]
