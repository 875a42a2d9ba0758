"""Weight schedules: how much each snapshot counts in an average.

A :class:`Schedule` is a small immutable value with two faces:

* the offline form ``weights(n)``: float64 weights for ``n`` snapshots, **oldest first**,
  summing to 1;
* where one exists, the online form ``decay(t)``: when the ``t``-th snapshot (1-based)
  arrives, ``avg_t = decay(t) * avg_{t-1} + (1 - decay(t)) * x_t``, with ``avg_1 = x_1``
  (``decay(1)`` is never used: the first snapshot is copied).

Folding ``decay`` over ``t = 1..n`` reproduces ``weights(n)`` for every schedule that has
both faces; the property tests check it. Schedules are made by the factories below, resolved
from names by :func:`get`, and from anything ``polyak.average`` accepts by :func:`resolve`.

Example:
    >>> import polyak
    >>> polyak.schedules.linear().weights(4)
    array([0.1, 0.2, 0.3, 0.4])
    >>> polyak.schedules.ema(0.5)
    ema(decay=0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from polyak._errors import EmptyInputError, NoOnlineFormError, ScheduleError, WeightsError

__all__ = [
    "Schedule",
    "equal",
    "linear",
    "exponential",
    "ema",
    "tail",
    "swa",
    "polynomial",
    "power",
    "ema_warmup",
    "explicit",
    "custom",
    "get",
    "resolve",
    "from_spec",
    "names",
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
]

WeightsFn = Callable[[int], "np.ndarray | Sequence[float]"]
DecayFn = Callable[[int], float]

# sqrt(1/12) = 0.28868 is the sigma_rel of the plain mean (gamma = 0); the contract
# states the open interval with this rounded bound.
_MAX_SIGMA_REL = 0.2887


class Schedule:
    """An immutable weight schedule; make one with a factory such as :func:`ema`.

    Attributes:
        name: the factory's name (``"ema"``), also the key :func:`get` resolves.
        params: the factory's parameters, read-only (``{"decay": 0.999}``).
    """

    __slots__ = ("_name", "_params", "_weights_fn", "_decay_fn")

    def __init__(
        self,
        name: str,
        params: Mapping[str, Any],
        weights_fn: WeightsFn,
        decay_fn: DecayFn | None = None,
    ) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_params", MappingProxyType(dict(params)))
        object.__setattr__(self, "_weights_fn", weights_fn)
        object.__setattr__(self, "_decay_fn", decay_fn)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @property
    def name(self) -> str:
        return self._name

    @property
    def params(self) -> Mapping[str, Any]:
        return self._params

    @property
    def online(self) -> bool:
        """Whether the schedule has an online form ``decay(t)``."""
        return self._decay_fn is not None

    def weights(self, n: int, *, normalize: bool = True) -> np.ndarray:
        """The float64 weights for ``n`` snapshots, oldest first.

        Args:
            n: number of snapshots, at least 1.
            normalize: divide by the sum (built-in schedules already sum to 1). With
                ``False``, explicit and custom schedules give their weights as they are.

        Returns:
            A float64 array of length ``n``.

        Raises:
            EmptyInputError: ``n < 1``.
            WeightsError: the weights are not finite, have the wrong length, or (with
                ``normalize``) sum to zero, a negative or a non-finite number.

        Example:
            >>> exponential(alpha=1.0).weights(2).round(4)
            array([0.2689, 0.7311])
        """
        n = _check_count(n)
        raw = self._weights_fn(n)
        try:
            w = np.array(raw, dtype=np.float64, copy=True)
        except (TypeError, ValueError) as err:
            raise WeightsError(f"{self!r}: weights are not numbers: {err}") from None
        if w.shape != (n,):
            raise WeightsError(
                f"{self!r}: expected {n} weights (one per snapshot), got shape {w.shape}"
            )
        bad = np.flatnonzero(~np.isfinite(w))
        if bad.size:
            raise WeightsError(f"{self!r}: weight[{bad[0]}] = {w[bad[0]]} is not finite")
        if normalize:
            total = math.fsum(w.tolist())
            if not total > 0 or not math.isfinite(total):
                raise WeightsError(
                    f"{self!r}: weights sum to {total!r}; normalize=True needs a positive, "
                    "finite sum (pass normalize=False to use the weights as given)"
                )
            w /= total
        return w

    def decay(self, t: int) -> float:
        """The online decay when the ``t``-th snapshot (1-based) arrives.

        ``avg_t = decay(t) * avg_{t-1} + (1 - decay(t)) * x_t``; ``decay(1)`` is never used,
        since the first snapshot is copied.

        Raises:
            NoOnlineFormError: the schedule depends on the final count (e.g. ``tail(k)``).
            ScheduleError: ``t < 1``.

        Example:
            >>> equal().decay(4)
            0.75
        """
        if self._decay_fn is None:
            raise NoOnlineFormError(
                f"{self!r} has no online form: its weights depend on the final number of "
                "snapshots. Save snapshots with polyak.SnapshotDir and average them afterwards."
            )
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
            raise ScheduleError(f"decay(t) needs an integer t >= 1, got t={t!r}")
        return float(self._decay_fn(int(t)))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self._params.items())
        return f"{self._name}({args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return (
            self._name == other._name
            and _params_key(self._params) == _params_key(other._params)
            and (self._name != "custom" or self._weights_fn is other._weights_fn)
        )

    def __hash__(self) -> int:
        return hash((self._name, _params_key(self._params)))


def _short(value: Any) -> str:
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    return repr(value)


def _params_key(params: Mapping[str, Any]) -> tuple:
    return tuple(
        (k, tuple(v) if isinstance(v, (list, tuple)) else v)
        for k, v in params.items()
        if not callable(v)
    )


def _check_count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise EmptyInputError(f"the number of snapshots must be an integer, got n={n!r}")
    if n < 1:
        raise EmptyInputError(f"nothing to average: n={n} snapshots (need at least 1)")
    return int(n)


def _number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    factory: str,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ScheduleError(f"{factory}() needs a number {name}, got {name}={value!r}")
    v = float(value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if math.isnan(v) or too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ScheduleError(
            f"{factory}() needs {name} in {lo}{low}, {high}{hi}, got {name}={value!r}"
        )
    return v


def _integer(name: str, value: Any, *, low: int, factory: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ScheduleError(f"{factory}() needs an integer {name} >= {low}, got {name}={value!r}")
    return int(value)


def _fold_weights(decay: DecayFn, n: int) -> np.ndarray:
    """Offline weights implied by an online decay: ``w_k = (1 - d_k) * prod_{j>k} d_j``."""
    d = np.array([0.0] + [decay(t) for t in range(2, n + 1)], dtype=np.float64)
    keep = np.ones(n, dtype=np.float64)
    if n > 1:
        # keep[k] = prod_{j>k} d_j, as a reversed cumulative product.
        keep[:-1] = np.cumprod(d[:0:-1])[::-1]
    return (1.0 - d) * keep


# --- the factories ---------------------------------------------------------------------


def equal() -> Schedule:
    """The arithmetic mean: every snapshot weighs ``1/n``; ``decay(t) = (t - 1) / t``.

    Example:
        >>> equal().weights(4)
        array([0.25, 0.25, 0.25, 0.25])
    """
    return Schedule("equal", {}, lambda n: np.full(n, 1.0 / n), lambda t: (t - 1) / t)


def linear() -> Schedule:
    """Weight proportional to recency: oldest-first ``1, 2, ..., n`` normalized.

    The Keras weight-averaging tutorial's ``[i/n for i in range(n, 0, -1)]``, applied
    newest-first. Online: ``decay(t) = (t - 1) / (t + 1)``.

    Example:
        >>> linear().weights(3).round(4)
        array([0.1667, 0.3333, 0.5   ])
    """
    return Schedule(
        "linear",
        {},
        lambda n: np.arange(1, n + 1, dtype=np.float64) / (n * (n + 1) / 2),
        lambda t: (t - 1) / (t + 1),
    )


def exponential(alpha: float = 2.0) -> Schedule:
    r"""Exponential decay by age: newest-first weights ``exp(-i / alpha)``, i = 1..n.

    Each older snapshot weighs ``exp(-1/alpha)`` of the next (the Keras tutorial's
    exponential schedule). Online, with ``r = exp(-1/alpha)``:
    ``decay(t) = r * (1 - r**(t-1)) / (1 - r**t)``.

    Args:
        alpha: the decay length in snapshots, > 0.

    Raises:
        ScheduleError: ``alpha`` is not a positive number.

    Example:
        >>> exponential(2.0).weights(3).round(4)
        array([0.1863, 0.3072, 0.5065])
    """
    a = _number("alpha", alpha, low=0.0, low_open=True, factory="exponential")

    def weights(n: int) -> np.ndarray:
        w = np.exp(-(n - np.arange(1, n + 1, dtype=np.float64)) / a)
        return w / w.sum()

    # expm1 keeps the ratio accurate when alpha is large and each step decays very little.
    return Schedule(
        "exponential",
        {"alpha": alpha},
        weights,
        lambda t: math.exp(-1.0 / a) * math.expm1(-(t - 1) / a) / math.expm1(-t / a),
    )


def ema(decay: float) -> Schedule:
    """The classic exponential moving average, started from the first snapshot.

    ``avg_1 = x_1``, then ``avg_t = decay * avg_{t-1} + (1 - decay) * x_t``: the EMA of torch
    ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``, timm ``ModelEmaV2``
    and Keras ``use_ema``,
    with no bias correction. The first snapshot weighs ``decay**(n-1)``, snapshot ``k >= 2``
    weighs ``(1 - decay) * decay**(n-k)``.

    Args:
        decay: weight of the old average, in [0, 1].

    Raises:
        ScheduleError: ``decay`` outside [0, 1].

    Example:
        >>> ema(0.5).weights(3)
        array([0.25, 0.25, 0.5 ])
    """
    d = _number("decay", decay, low=0.0, high=1.0, factory="ema")

    def weights(n: int) -> np.ndarray:
        # decay**k in float64: float32 would lose the first snapshot's weight for long runs.
        w = (1.0 - d) * d ** (n - np.arange(1, n + 1, dtype=np.float64))
        w[0] = d ** (n - 1)
        return w

    return Schedule("ema", {"decay": decay}, weights, lambda t: d)


def tail(k: int | None = None, *, fraction: float | None = None) -> Schedule:
    """Uniform over the last ``k`` snapshots (Polyak-Ruppert tail averaging).

    With ``fraction``, ``k = max(1, ceil(fraction * n))``. There is no online form: which
    snapshots count depends on the final ``n`` (use :class:`polyak.SnapshotDir`).

    Args:
        k: number of newest snapshots to average, >= 1 (fewer snapshots: all of them).
        fraction: alternatively, the fraction of snapshots to keep, in (0, 1].

    Raises:
        ScheduleError: neither or both of ``k`` and ``fraction``, or out of range.

    Example:
        >>> tail(2).weights(4)
        array([0. , 0. , 0.5, 0.5])
        >>> tail(fraction=0.25).weights(8)
        array([0. , 0. , 0. , 0. , 0. , 0. , 0.5, 0.5])
    """
    if (k is None) == (fraction is None):
        raise ScheduleError("tail() needs exactly one of k or fraction, e.g. tail(10)")
    if k is not None:
        kk = _integer("k", k, low=1, factory="tail")
        params: dict[str, Any] = {"k": kk}

        def count(n: int) -> int:
            return min(kk, n)
    else:
        f = _number("fraction", fraction, low=0.0, high=1.0, low_open=True, factory="tail")
        params = {"fraction": fraction}

        def count(n: int) -> int:
            # round() first so that 0.1 * 30 = 3.0000000000000004 keeps 3, not 4.
            return min(n, max(1, math.ceil(round(f * n, 9))))

    def weights(n: int) -> np.ndarray:
        m = count(n)
        w = np.zeros(n)
        w[n - m :] = 1.0 / m
        return w

    return Schedule("tail", params, weights, None)


def swa(start: int) -> Schedule:
    """Stochastic Weight Averaging: uniform over snapshots with 0-based index >= ``start``.

    Before ``start`` the average tracks the newest snapshot, as torch's SWA model does
    before ``swa_start``: for ``n <= start``, ``weights(n)`` is all on the newest, which is
    what folding ``decay(t)`` gives online. From ``start`` on it is the running mean.

    Args:
        start: 0-based index of the first snapshot to average.

    Raises:
        ScheduleError: ``start`` is not a non-negative integer.

    Example:
        >>> swa(2).weights(4)
        array([0. , 0. , 0.5, 0.5])
        >>> swa(2).weights(2)  # not started yet: the newest snapshot
        array([0., 1.])
    """
    s = _integer("start", start, low=0, factory="swa")

    def weights(n: int) -> np.ndarray:
        w = np.zeros(n)
        if n <= s:
            w[-1] = 1.0
        else:
            w[s:] = 1.0 / (n - s)
        return w

    def decay(t: int) -> float:
        i = t - 1
        return 0.0 if i <= s else (i - s) / (i - s + 1)

    return Schedule("swa", {"start": s}, weights, decay)


def polynomial(eta: float) -> Schedule:
    """Polynomial-decay averaging: ``decay(t) = 1 - (eta + 1) / (t + eta)``.

    ``eta = 0`` is the plain mean; larger ``eta`` forgets early iterates faster while still
    averaging a growing window (Shamir & Zhang, "Stochastic Gradient Descent for Non-smooth
    Optimization: Convergence Results and Optimal Averaging Schemes", ICML 2013).

    Args:
        eta: the decay exponent, >= 0.

    Raises:
        ScheduleError: ``eta`` negative or not a number.

    Example:
        >>> polynomial(0.0).weights(4)
        array([0.25, 0.25, 0.25, 0.25])
    """
    e = _number("eta", eta, low=0.0, factory="polynomial")

    def decay(t: int) -> float:
        return 1.0 - (e + 1.0) / (t + e)

    return Schedule("polynomial", {"eta": eta}, lambda n: _fold_weights(decay, n), decay)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of a power-function EMA profile with exponent ``gamma``.

    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 * (gamma + 3)))`` (Karras et al. 2024,
    eq. 3).

    Example:
        >>> round(gamma_to_sigma_rel(6.94), 3)
        0.1
    """
    g = _number("gamma", gamma, low=-1.0, low_open=True, factory="gamma_to_sigma_rel")
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-EMA exponent ``gamma`` for a relative width ``sigma_rel``, as EDM2 does.

    The largest real root of ``g**3 + 7 g**2 + (16 - s**-2) g + (12 - s**-2) = 0``
    (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
    CVPR 2024, section 3).

    Raises:
        ScheduleError: ``sigma_rel`` outside (0, 0.2887).

    Example:
        >>> round(sigma_rel_to_gamma(0.05), 2), round(sigma_rel_to_gamma(0.10), 2)
        (16.97, 6.94)
    """
    s = _number(
        "sigma_rel",
        sigma_rel,
        low=0.0,
        high=_MAX_SIGMA_REL,
        low_open=True,
        high_open=True,
        factory="power",
    )
    s2 = s**-2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots.real))].real
    return float(real.max())


def power(gamma: float | None = None, *, sigma_rel: float | None = None) -> Schedule:
    r"""The power-function EMA of EDM2: ``decay(t) = (1 - 1/t) ** (gamma + 1)``.

    Its offline weights have a closed form, for k = 1..n:
    ``w_k = (k**(gamma+1) - (k-1)**(gamma+1)) / n**(gamma+1)``. Unlike a fixed-decay EMA the
    averaging window grows with training (its width relative to the run is ``sigma_rel``),
    so no start-up bias and no per-run tuning (Karras et al., "Analyzing and Improving the
    Training Dynamics of Diffusion Models", CVPR 2024).

    Args:
        gamma: the exponent, > -1 (0 is the plain mean).
        sigma_rel: alternatively the relative width in (0, 0.2887), converted with
            :func:`sigma_rel_to_gamma`.

    Raises:
        ScheduleError: neither or both given, or out of range.

    Example:
        >>> power(1.0).weights(2)
        array([0.25, 0.75])
        >>> round(power(sigma_rel=0.10).params["gamma"], 2)
        6.94
    """
    if (gamma is None) == (sigma_rel is None):
        raise ScheduleError("power() needs exactly one of gamma or sigma_rel, e.g. power(7.0)")
    params: dict[str, Any]
    if sigma_rel is not None:
        g = sigma_rel_to_gamma(sigma_rel)
        params = {"gamma": g, "sigma_rel": sigma_rel}
    else:
        g = _number("gamma", gamma, low=-1.0, low_open=True, factory="power")
        params = {"gamma": gamma}
    p = g + 1.0

    def weights(n: int) -> np.ndarray:
        k = np.arange(1, n + 1, dtype=np.float64)
        # (k/n)**p - ((k-1)/n)**p: scaled first, so that large n and gamma cannot overflow.
        return (k / n) ** p - ((k - 1) / n) ** p

    return Schedule("power", params, weights, lambda t: (1.0 - 1.0 / t) ** p)


def ema_warmup(
    decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0
) -> Schedule:
    """The warmed-up EMA of timm and ema-pytorch, with decay rising to ``decay``.

    ``decay(t) = clip(1 - (1 + (t - 1) / inv_gamma) ** -power, min_decay, decay)``, where
    ``t`` is the 1-based index of the snapshot being folded in: ``t - 1`` updates have come
    before it, so the first update (``t = 1``) copies the snapshot, as ``avg_1 = x_1``.
    ``power = 2/3`` suits short runs, ``3/4`` long ones (ema-pytorch's advice).

    Args:
        decay: the largest decay, in [0, 1].
        inv_gamma: the warm-up time scale in steps, > 0.
        power: the warm-up exponent, > 0.
        min_decay: the smallest decay, in [0, decay].

    Raises:
        ScheduleError: an argument out of range.

    Example:
        >>> s = ema_warmup(decay=0.999, power=1.0)
        >>> s.decay(1), s.decay(2), s.decay(4)
        (0.0, 0.5, 0.75)
    """
    f = "ema_warmup"
    d = _number("decay", decay, low=0.0, high=1.0, factory=f)
    ig = _number("inv_gamma", inv_gamma, low=0.0, low_open=True, factory=f)
    pw = _number("power", power, low=0.0, low_open=True, factory=f)
    lo = _number("min_decay", min_decay, low=0.0, high=d, factory=f)

    def decay_fn(t: int) -> float:
        return min(max(1.0 - (1.0 + (t - 1) / ig) ** -pw, lo), d)

    params = {"decay": decay, "inv_gamma": inv_gamma, "power": power, "min_decay": min_decay}
    return Schedule(f, params, lambda n: _fold_weights(decay_fn, n), decay_fn)


def explicit(weights: Sequence[float] | np.ndarray) -> Schedule:
    """Weights given one per snapshot, oldest first (normalized unless ``normalize=False``).

    Online, ``decay(t) = S_{t-1} / S_t`` with ``S_t`` the sum of the first ``t`` weights, for
    ``t`` up to ``len(weights)`` and positive partial sums.

    Args:
        weights: a 1-D sequence of finite numbers.

    Raises:
        ScheduleError: not a 1-D sequence of finite numbers.

    Example:
        >>> explicit([1, 1, 2]).weights(3)
        array([0.25, 0.25, 0.5 ])
    """
    try:
        w = np.array(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise ScheduleError(f"explicit() needs a sequence of numbers, got {weights!r}") from None
    if w.ndim != 1 or w.size == 0:
        raise ScheduleError(f"explicit() needs a non-empty 1-D sequence, got shape {w.shape}")
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        raise ScheduleError(f"explicit(): weights[{bad[0]}] = {w[bad[0]]} is not finite")
    w.setflags(write=False)
    partial = np.cumsum(w)

    def weights_fn(n: int) -> np.ndarray:
        if n != w.size:
            raise WeightsError(
                f"explicit schedule has {w.size} weights but {n} snapshots were given"
            )
        return w

    def decay(t: int) -> float:
        if t > w.size:
            raise ScheduleError(
                f"explicit schedule has {w.size} weights: no weight for snapshot t={t}"
            )
        if t == 1 or partial[t - 2] == 0:
            return 0.0
        if not partial[t - 1] > 0:
            raise ScheduleError(
                f"explicit schedule: the first {t} weights sum to {partial[t - 1]}; the "
                "online form needs positive partial sums"
            )
        return float(partial[t - 2] / partial[t - 1])

    return Schedule("explicit", {"weights": w.tolist()}, weights_fn, decay)


def custom(fn: Callable[[int], Sequence[float] | np.ndarray]) -> Schedule:
    """A schedule from a function ``n -> weights`` (oldest first). No online form.

    Args:
        fn: called with the number of snapshots; returns that many finite weights.

    Raises:
        ScheduleError: ``fn`` is not callable.

    Example:
        >>> custom(lambda n: [0.0] * (n - 1) + [1.0]).weights(3)
        array([0., 0., 1.])
    """
    if not callable(fn):
        raise ScheduleError(f"custom() needs a callable n -> weights, got {fn!r}")
    return Schedule("custom", {"fn": fn}, fn, None)


# --- names -------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[..., Schedule]] = {
    "equal": equal,
    "linear": linear,
    "exponential": exponential,
    "ema": ema,
    "tail": tail,
    "swa": swa,
    "polynomial": polynomial,
    "power": power,
    "ema_warmup": ema_warmup,
    "explicit": explicit,
}


def names() -> list[str]:
    """The schedule names :func:`get` knows.

    Example:
        >>> "ema" in names()
        True
    """
    return list(_FACTORIES)


def get(name: str, **kwargs: Any) -> Schedule:
    """Make a schedule by name, e.g. ``get("ema", decay=0.999)``.

    Args:
        name: one of :func:`names` (case-insensitive; ``-`` and ``_`` alike).
        **kwargs: the factory's parameters.

    Returns:
        The schedule.

    Raises:
        ScheduleError: unknown name, or parameters the factory does not take or needs.

    Example:
        >>> get("tail", k=3)
        tail(k=3)
    """
    if not isinstance(name, str):
        raise ScheduleError(f"a schedule name must be a string, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    factory = _FACTORIES.get(key)
    if factory is None:
        raise ScheduleError(f"unknown schedule {name!r}; known schedules: {', '.join(_FACTORIES)}")
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ScheduleError(f"schedule {key!r}: {err}") from None


def from_spec(name: str, params: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from its ``name`` and ``params`` (as stored in file metadata).

    ``power`` made from ``sigma_rel`` is rebuilt from its ``gamma``.

    Raises:
        ScheduleError: unknown name, or a ``custom`` schedule (a function cannot be stored).

    Example:
        >>> s = ema(0.99)
        >>> from_spec(s.name, s.params) == s
        True
    """
    if name == "custom":
        raise ScheduleError("a custom schedule wraps a function and cannot be rebuilt from a spec")
    params = dict(params)
    if name == "power" and "gamma" in params:
        params.pop("sigma_rel", None)
    return get(name, **params)


def resolve(schedule: Any) -> Schedule:
    """Turn anything :func:`polyak.average` accepts as a schedule into a :class:`Schedule`.

    ``None`` or ``"equal"``, a name (``"linear"``, ``"exponential"``, or any of
    :func:`names` whose parameters have defaults), a :class:`Schedule`, an explicit sequence
    of weights (oldest first), or a callable ``n -> weights``.

    Raises:
        ScheduleError: anything else.

    Example:
        >>> resolve([1, 2, 3])
        explicit(weights=[1.0, 2.0, 3.0])
    """
    if schedule is None:
        return equal()
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        return get(schedule)
    if callable(schedule):
        return custom(schedule)
    if isinstance(schedule, (Sequence, np.ndarray)):
        return explicit(schedule)
    raise ScheduleError(
        "schedule must be None, a name, a polyak.Schedule, a sequence of weights or a "
        f"callable n -> weights; got {type(schedule).__name__}"
    )
