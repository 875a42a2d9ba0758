"""What a model holds, by name: the tensors an averager folds and how each one is treated.

A model's ``state_dict()`` names its parameters and persistent buffers; tied weights appear
under several names but are one tensor, folded once. Each distinct tensor gets a *role*:

* ``"float"``: averaged by the schedule (float/complex parameters, and float buffers with
  ``buffers="average"``);
* ``"last"``: copied from the newest model (buffers with ``buffers="copy"``, int/bool
  tensors with ``int_policy="last"``);
* ``"first"``: copied from the first model folded (``int_policy="first"``);
* ``"int_average"``: a float64 running mean, rounded when read (``int_policy="average"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyak._errors import DtypeError, PolyakError, ShapeError
from polyak._tree import check_names
from polyak.torch._sharded import is_dtensor

__all__ = [
    "generation",
    "Spec",
    "spec_of",
    "named_tensors",
    "role_of",
    "accumulator_dtype",
    "match",
]

# Bumped whenever any module registers a new parameter or buffer object (setattr, assign
# loads): an averager re-checks its model's tensors only then, so the steady state does no
# per-tensor work and a swapped parameter is still seen. torch offers these hooks globally.
# Re-assigning the same tensor (``self.n_averaged += 1`` in AveragedModel) changes nothing.
_generation = [0]


def _on_parameter(module: torch.nn.Module, name: str, value: object) -> None:
    if module._parameters.get(name) is not value:
        _generation[0] += 1


def _on_buffer(module: torch.nn.Module, name: str, value: object) -> None:
    if module._buffers.get(name) is not value:
        _generation[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_on_parameter)
torch.nn.modules.module.register_module_buffer_registration_hook(_on_buffer)


def generation() -> int:
    """A counter that changes whenever any module registers a parameter or buffer."""
    return _generation[0]


_LOW_PRECISION = {
    torch.float16,
    torch.bfloat16,
    *(
        getattr(torch, n)
        for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
        if hasattr(torch, n)
    ),
}


@dataclass(frozen=True)
class Spec:
    """What a tensor must keep for the averager to fold it: shape, dtype, device, sharding."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    layout: tuple | None  # (mesh, placements) of a DTensor, None for a plain tensor

    def describe(self) -> str:
        kind = "tensor" if self.layout is None else f"DTensor{self.layout[1]}"
        return f"{kind} {self.dtype} on {self.device}"


def spec_of(t: torch.Tensor) -> Spec:
    """The :class:`Spec` of a tensor."""
    layout = (t.device_mesh, tuple(t.placements)) if is_dtensor(t) else None
    return Spec(tuple(t.shape), t.dtype, t.device, layout)


def named_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's distinct tensors by state_dict name, and where each name points.

    Returns:
        ``(tensors, names)``: ``tensors`` maps the first name of each distinct tensor to the
        tensor itself (the Parameter, not a detached copy, so in-place optimizer steps are
        seen); ``names`` maps every state_dict name, in order, to that first name (tied
        weights share one). Non-tensor entries (``get_extra_state``) are left out.

    Raises:
        PolyakError: ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise PolyakError(
            f"expected a torch.nn.Module, got {type(model).__name__}; for a state_dict or "
            "another pytree of arrays use polyak.Averager"
        )
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor):
            names[name] = first_name.setdefault(id(t), name)
            tensors.setdefault(names[name], t)
    return tensors, names


def role_of(t: torch.Tensor, *, is_param: bool, buffers: str, int_policy: str) -> str:
    """How a tensor is treated (see the module docstring)."""
    if not is_param and buffers == "copy":
        return "last"
    if t.is_floating_point() or t.is_complex():
        return "float"
    if int_policy == "average":
        return "int_average"
    return int_policy  # "last" or "first"; "error" is refused before this is called


def accumulator_dtype(t: torch.Tensor, role: str, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor's average is kept in.

    float32 for fp16/bf16/fp8 (rounding the average back to 8 significant bits at every
    step would lose the small ``(1 - decay) * x`` terms), else the tensor's own dtype;
    ``dtype`` overrides it for real floating tensors.
    """
    if role == "int_average":
        return torch.float64
    if role != "float" or t.is_complex():
        return t.dtype
    if dtype is not None:
        return dtype
    return torch.float32 if t.dtype in _LOW_PRECISION else t.dtype


def match(expected: dict[str, Spec], given: dict[str, torch.Tensor], what: str) -> None:
    """Check that ``given`` names the tensors of ``expected``, alike in shape, dtype, device
    and sharding (what folding needs).

    Raises:
        StructureError: names missing or unexpected, all listed, sorted.
        ShapeError, DtypeError: naming every tensor that differs.
    """
    check_names(
        expected,
        given,
        f"{what} does not have the parameters and buffers the averager was built for",
    )
    shapes, kinds = [], []
    for name, e in expected.items():
        g = spec_of(given[name])
        if g.shape != e.shape:
            shapes.append(f"{name}: shape {g.shape}, expected {e.shape}")
        elif g != e:
            kinds.append(f"{name}: {g.describe()}, expected {e.describe()}")
    if shapes:
        raise ShapeError(f"{what}: parameters differ in shape: " + "; ".join(shapes))
    if kinds:
        raise DtypeError(f"{what}: parameters differ in dtype/device: " + "; ".join(kinds))
