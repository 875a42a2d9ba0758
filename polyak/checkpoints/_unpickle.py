"""A restricted unpickler for the ``data.pkl`` of a torch zip checkpoint.

It never imports torch and never calls anything the file names, except the few inert
stand-ins below: the tensor rebuild functions become :class:`TensorRef` records (storage,
offset, shape, stride, dtype), storages become :class:`StorageRef` records naming a zip member.
Any other global (``os.system``, ``builtins.eval``, a model class) raises
:class:`UnsafeCheckpointError` in ``find_class``, before it could be called. The allow-list
follows torch's own ``weights_only`` unpickler (``torch/_weights_only_unpickler.py``), reduced
to what a state dict needs.
"""

from __future__ import annotations

import io
import pickle
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from polyak.checkpoints._errors import CheckpointError, UnsafeCheckpointError

__all__ = ["StorageRef", "TensorRef", "load_pickle", "TORCH_DTYPES"]

# torch dtype name -> numpy dtype (little-endian, as torch writes on every platform it runs on).
TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
    "complex64": np.dtype("<c8"),
    "complex128": np.dtype("<c16"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint64": np.dtype("<u8"),
    "uint32": np.dtype("<u4"),
    "uint16": np.dtype("<u2"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype(np.bool_),
}

# Legacy typed storages (``torch.FloatStorage``) that _rebuild_tensor_v2 receives.
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


@dataclass(frozen=True)
class _StorageType:
    dtype_name: str


@dataclass(frozen=True)
class _TorchDtype:
    name: str


@dataclass(frozen=True)
class StorageRef:
    """One storage: the zip member ``data/<key>`` holding its bytes, and its element dtype."""

    key: str
    dtype_name: str


@dataclass(frozen=True)
class TensorRef:
    """One tensor as pickled: a view of ``storage`` (offset and strides in elements)."""

    storage: StorageRef
    offset: int
    shape: tuple[Any, ...]
    stride: tuple[Any, ...]
    dtype_name: str


def _rebuild_tensor_v2(storage, offset, size, stride, *_rest):
    if not isinstance(storage, StorageRef):
        raise CheckpointError("tensor record without a storage")
    return TensorRef(storage, offset, tuple(size), tuple(stride), storage.dtype_name)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_rest):
    if not isinstance(storage, StorageRef) or not isinstance(dtype, _TorchDtype):
        raise CheckpointError("tensor record without a storage or dtype")
    return TensorRef(storage, offset, tuple(size), tuple(stride), dtype.name)


def _rebuild_parameter(data, *_rest):
    return data  # a Parameter's weights are its tensor's


def _unsupported(what: str):
    def refuse(*_args):
        raise CheckpointError(f"{what} tensors are not supported (only dense tensors)")

    return refuse


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("collections", "Counter"): Counter,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "slice"): slice,
        ("_codecs", "encode"): lambda text, encoding="utf-8": str(text).encode(encoding),
        ("torch", "Size"): tuple,
        ("torch", "device"): lambda *args: ":".join(str(a) for a in args),
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._utils", "_rebuild_qtensor"): _unsupported("quantized"),
        ("torch._utils", "_rebuild_sparse_tensor"): _unsupported("sparse"),
        ("torch._utils", "_rebuild_wrapper_subclass"): _unsupported("tensor-subclass"),
        ("torch.storage", "UntypedStorage"): _StorageType("uint8"),
        ("torch", "UntypedStorage"): _StorageType("uint8"),
    }
    for name in TORCH_DTYPES:
        allowed[("torch", name)] = _TorchDtype(name)
    for storage, name in _STORAGE_DTYPES.items():
        allowed[("torch", storage)] = _StorageType(name)
    return allowed


_ALLOWED = _allowed()


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path = path
        self._storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                f"{self._path}: the checkpoint's pickle references {module}.{name}, which is "
                "not a tensor or container type; polyak refuses to load it (nothing from the "
                "file was run). If you trust the file, load it with torch and re-save its "
                "state dict (torch.save(model.state_dict(), path))"
            )
        return found

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise CheckpointError(f"{self._path}: malformed storage record {pid!r:.80}")
        # Two tensors over one storage (tied weights) share one record.
        ref = self._storages.get(key)
        if ref is None:
            ref = self._storages[key] = StorageRef(key, storage_type.dtype_name)
        return ref


def load_pickle(data: bytes, path: str) -> Any:
    """Unpickle ``data.pkl`` with only the allow-list; tensors come back as :class:`TensorRef`.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allow-list.
        CheckpointError: the pickle is malformed or holds unsupported tensors.
    """
    try:
        return _Unpickler(data, path).load()
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        text = str(e)
        raise CheckpointError(text if text.startswith(path) else f"{path}: {text}") from None
    except Exception as e:  # a malformed pickle can raise almost anything
        raise CheckpointError(
            f"{path}: cannot read the checkpoint's pickle ({type(e).__name__}: {e})"
        ) from None
