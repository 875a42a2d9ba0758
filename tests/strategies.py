"""Hypothesis strategies shared by the property tests: random pytrees and schedules."""

from __future__ import annotations

import collections
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import optree
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from polyak import schedules

FLOAT_DTYPES = [
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.float32),
    np.dtype(np.float64),
]
Pair = collections.namedtuple("Pair", "kernel bias")


@dataclass(frozen=True)
class Leaf:
    """A placeholder leaf of a tree skeleton: its shape and dtype (not a pytree node)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def leaves_specs(dtypes=FLOAT_DTYPES):
    return st.builds(
        Leaf,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
        st.sampled_from(dtypes),
    )


def skeletons(dtypes=FLOAT_DTYPES):
    """Random nesting of dict / OrderedDict / list / tuple / namedtuple over Leaf specs."""
    keys = st.text(alphabet="abcdefgh_", min_size=1, max_size=4)

    def extend(children):
        return st.one_of(
            st.dictionaries(keys, children, min_size=1, max_size=3),
            st.dictionaries(keys, children, min_size=1, max_size=3).map(
                lambda d: collections.OrderedDict(sorted(d.items()))
            ),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.tuples(children, children).map(lambda t: Pair(*t)),
        )

    return st.recursive(leaves_specs(dtypes), extend, max_leaves=6)


def fill(draw, skeleton, *, low=-100.0, high=100.0):
    """Draw arrays for every Leaf of ``skeleton`` (values drawn in float64, then cast)."""

    def one(leaf: Leaf):
        values = draw(
            hnp.arrays(
                np.float64,
                leaf.shape,
                elements=st.floats(low, high, allow_nan=False, allow_subnormal=False),
            )
        )
        # Subnormals of the target dtype have fewer significant bits than the relative
        # tolerances assume (1e-40 is normal in float64, subnormal in float32): flush them.
        values[np.abs(values) < float(ml_dtypes.finfo(leaf.dtype).smallest_normal)] = 0.0
        return values.astype(leaf.dtype)

    return optree.tree_map(one, skeleton)


@st.composite
def tree_lists(draw, *, min_n=1, max_n=6, dtypes=FLOAT_DTYPES):
    """A list of n trees sharing one random structure, shapes and dtypes."""
    skeleton = draw(skeletons(dtypes))
    n = draw(st.integers(min_n, max_n))
    return [fill(draw, skeleton) for _ in range(n)]


def online_schedules():
    """Every built-in schedule with an online form, with random parameters."""
    unit = st.floats(0.0, 1.0)
    return st.one_of(
        st.just(schedules.equal()),
        st.just(schedules.linear()),
        st.floats(0.05, 50.0).map(schedules.exponential),
        unit.map(schedules.ema),
        st.integers(0, 4).map(schedules.swa),
        st.floats(0.0, 10.0).map(schedules.polynomial),
        st.floats(-0.9, 30.0).map(lambda g: schedules.power(g)),
        st.floats(0.01, 0.28).map(lambda s: schedules.power(sigma_rel=s)),
        st.builds(
            lambda d, ig, p, frac: schedules.ema_warmup(d, ig, p, min_decay=frac * d),
            unit,
            st.floats(0.1, 100.0),
            st.floats(0.1, 2.0),
            unit,
        ),
    )


def builtin_schedules():
    """Every built-in schedule (online or not) with random parameters."""
    return st.one_of(
        online_schedules(),
        st.integers(1, 8).map(schedules.tail),
        st.floats(0.01, 1.0).map(lambda f: schedules.tail(fraction=f)),
    )


def fold(schedule, n):
    """Offline weights implied by folding the online decay(t), written plainly."""
    w = np.zeros(n)
    for t in range(1, n + 1):
        d = 0.0 if t == 1 else schedule.decay(t)
        w[: t - 1] *= d
        w[t - 1] = 1.0 - d
    return w
