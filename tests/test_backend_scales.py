"""float8_e8m0fnu (MX power-of-two block scales) follows int_policy in every backend.

An arithmetic mean of exponents means little, so these tensors are treated like step
counters: "last"/"first" keep one input's bits, "average" casts the float64 mean back once,
"error" refuses. torch calls the dtype floating point; polyak's shared rule does not.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import polyak
from polyak import _backend

torch = pytest.importorskip("torch")

VALUES = ([1.0, 2.0, 4.0, 0.25], [2.0, 4.0, 8.0, 0.5], [4.0, 16.0, 0.5, 1.0])
E8M0 = ml_dtypes.float8_e8m0fnu


def _numpy_inputs() -> list[np.ndarray]:
    return [np.asarray(v, np.float64).astype(E8M0) for v in VALUES]


def _torch_inputs() -> list:
    return [torch.tensor(v, dtype=torch.float32).to(torch.float8_e8m0fnu) for v in VALUES]


def test_kind_is_int_for_numpy_and_torch():
    assert _backend.get(_numpy_inputs()[0]).kind(np.dtype(E8M0)) == "int"
    assert _backend.get(_torch_inputs()[0]).kind(torch.float8_e8m0fnu) == "int"
    # The float formats next to it stay floats.
    assert _backend.get(_torch_inputs()[0]).kind(torch.float8_e4m3fn) == "float"


@pytest.mark.parametrize("make", [_numpy_inputs, _torch_inputs], ids=["numpy", "torch"])
def test_int_policies(make):
    xs = make()

    def bits(x) -> bytes:
        return x.tobytes() if isinstance(x, np.ndarray) else x.view(torch.uint8).numpy().tobytes()

    assert bits(polyak.average(xs)) == bits(xs[-1])
    assert bits(polyak.average(xs, int_policy="first")) == bits(xs[0])
    # "average": the float64 mean of the decoded values, cast back once (not rounded to an
    # integer, which would turn 0.25 and 0.5 into 0).
    mean = np.mean(np.asarray(VALUES, np.float64), axis=0)
    got = polyak.average(xs, int_policy="average")
    expected = mean.astype(E8M0)
    if isinstance(got, np.ndarray):
        assert got.dtype == E8M0
        assert got.tobytes() == expected.tobytes()
    else:
        assert got.dtype == torch.float8_e8m0fnu
        # torch's own float64 -> e8m0 cast as the reference for the torch backend.
        ref = torch.from_numpy(mean).to(torch.float8_e8m0fnu)
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    with pytest.raises(polyak.DtypeError, match="int_policy='error'"):
        polyak.average(xs, int_policy="error")
