"""Whole-checkpoint ``load`` and ``save`` between pytrees of arrays and safetensors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import optree

from polyak import _backend
from polyak._errors import DtypeError, PolyakError, StructureError
from polyak.safetensors._errors import HeaderError
from polyak.safetensors._format import dtype_code
from polyak.safetensors._parse import shard_size
from polyak.safetensors._reader import Checkpoint
from polyak.safetensors._writer import CheckpointWriter, OutputLayout

__all__ = ["load", "save", "read_metadata", "to_numpy"]


# torch dtypes numpy cannot hold natively: reinterpret their bits as the ml_dtypes type.
def to_numpy(x: Any) -> np.ndarray:
    """A numpy array with the values of ``x`` (numpy, torch of any dtype, jax, keras,
    scalars), from the leaf's backend."""
    return x if isinstance(x, np.ndarray) else _backend.get(x).to_numpy(x)


def _key(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def save(
    tree: Any,
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    max_shard_size: int | str | None = None,
) -> None:
    """Write a pytree of arrays as a safetensors checkpoint, atomically.

    Nested keys are joined with ``"."`` (``{"dense": {"kernel": x}}`` -> ``"dense.kernel"``);
    tensors are laid out as the official writer does (wider dtypes first, then by name), so
    the data stays aligned.

    Args:
        tree: a pytree (dicts, lists, tuples, ...) of numpy/torch/jax arrays or scalars.
        path: ``*.safetensors`` for one file; anything else is a directory receiving a sharded
            checkpoint with ``model.safetensors.index.json``.
        metadata: string-to-string ``__metadata__``.
        max_shard_size: for a directory ``path``, the largest shard: bytes, or a size such
            as ``"5GB"`` (10**9 bytes) or ``"2GiB"``.

    Raises:
        StructureError: two leaves map to the same name.
        DtypeError: a leaf's dtype has no safetensors code (e.g. complex).
        HeaderError: metadata is not a map of strings to strings.
        PolyakError: ``max_shard_size`` is not a positive size, or is given for a
            ``.safetensors`` file (which is never sharded).
        OutputWriteError: the file system refused the write; nothing is left behind.

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> save({"dense": {"kernel": np.ones((2, 3), np.float32)}}, p)
        >>> sorted(load(p))
        ['dense.kernel']
    """
    shard_bytes = shard_size(max_shard_size, [path])
    if metadata is not None and not (
        isinstance(metadata, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise HeaderError(f"metadata must map strings to strings, got {metadata!r:.80}")
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    arrays: dict[str, np.ndarray] = {}
    for p, leaf in zip(paths, leaves, strict=True):
        name = _key(p)
        if name in arrays:
            raise StructureError(f"two leaves of the tree are both saved as {name!r}")
        arr = np.asarray(to_numpy(leaf))
        try:
            dtype_code(arr.dtype)
        except HeaderError:
            raise DtypeError(
                f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors"
            ) from None
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arrays[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    entries = sorted(
        ((n, a.dtype, a.shape) for n, a in arrays.items()),
        key=lambda e: (-e[1].itemsize, e[0]),
    )
    writer = CheckpointWriter(
        OutputLayout(os.fspath(path), entries, metadata=metadata, max_shard_size=shard_bytes)
    )
    try:
        for name, arr in arrays.items():
            writer.write(name, 0, arr)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


# load(framework=...) -> the official reader's framework name (safetensors.safe_open).
_FRAMEWORKS = {"torch": "pt", "jax": "flax"}


def load(
    path: str | os.PathLike[str], nested: bool = False, *, framework: str = "numpy"
) -> dict[str, Any]:
    """Read a safetensors file or sharded checkpoint directory into numpy arrays, or into
    torch or JAX tensors.

    With ``framework="numpy"`` (default) bf16 and fp8 tensors come as ``ml_dtypes`` arrays,
    which ``torch.from_numpy`` refuses; ``framework="torch"`` gives ``torch.bfloat16``
    tensors directly, read by the official ``safetensors`` library after polyak's strict
    header check (``"jax"`` gives ``jax.Array``; the framework must be installed).

    Args:
        path: a ``.safetensors`` file or a sharded checkpoint directory.
        nested: split names on ``"."`` into nested dicts (``"a.b"`` -> ``{"a": {"b": ...}}``).
        framework: ``"numpy"``, ``"torch"`` or ``"jax"``: the array type returned.

    Returns:
        ``{name: array}`` in file order (nested dicts when ``nested``).

    Raises:
        CheckpointError: the path is not a checkpoint.
        HeaderError: a header is malformed (naming the file and tensor).
        StructureError: with ``nested``, a name is both a tensor and a prefix of another.
        PolyakError: an unknown ``framework``.
        ModuleNotFoundError: the framework is not installed.

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> save({"a": {"b": np.arange(3)}}, p)
        >>> load(p, nested=True)["a"]["b"]
        array([0, 1, 2])
    """
    if framework != "numpy" and framework not in _FRAMEWORKS:
        raise PolyakError(
            f"framework={framework!r} is not one load() returns; use 'numpy', 'torch' or 'jax'"
        )
    with Checkpoint(path) as ck:
        if framework == "numpy":
            flat = {name: ck.read_tensor(name) for name in ck.keys()}
        else:
            files = [f.path for f in ck.files]
            flat = _official(files, [list(f.tensors) for f in ck.files], _FRAMEWORKS[framework])
    if not nested:
        return flat
    root: dict[str, Any] = {}
    for name, arr in flat.items():
        node = root
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise StructureError(
                    f"{os.fspath(path)}: tensor {'.'.join(parts[: i + 1])!r} is also a prefix "
                    f"of {name!r}; load it with nested=False"
                )
            node = child
        if parts[-1] in node:
            raise StructureError(
                f"{os.fspath(path)}: tensor {name!r} is also a prefix of other tensors; "
                "load it with nested=False"
            )
        node[parts[-1]] = arr
    return root


def _official(files: list[str], names: list[list[str]], framework: str) -> dict[str, Any]:
    """The tensors of checked files read by the official reader (it converts bf16 and fp8
    to the framework's own dtypes, which numpy cannot hold)."""
    from safetensors import safe_open

    flat: dict[str, Any] = {}
    for file, keys in zip(files, names):
        with safe_open(file, framework=framework) as f:
            for name in keys:
                flat[name] = f.get_tensor(name)
    return flat


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The ``__metadata__`` of a checkpoint (of its first shard), or None.

    Only the header is read, with the same strict validation as :func:`load`.

    Args:
        path: a ``.safetensors`` file or a sharded checkpoint directory.

    Returns:
        A new ``{key: value}`` dict of strings, or None when the file has no metadata.

    Raises:
        CheckpointError: the path is not a checkpoint.
        HeaderError: a header or the shard index is malformed (naming the file).

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> save({"a": np.ones(1)}, p, {"format": "np"})
        >>> read_metadata(p)
        {'format': 'np'}
    """
    with Checkpoint(path) as ck:
        meta = ck.metadata
        return dict(meta) if meta is not None else None
