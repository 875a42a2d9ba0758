"""Post-hoc EMA: choose the length of a power-function EMA after training.

During training, keep one or more power-function averages
(:func:`polyak.schedules.power`) and save them every few steps with :func:`save_snapshot`,
which writes each to a :class:`polyak.SnapshotDir` with the averaging time ``t`` and the
exponent ``gamma`` in the file's metadata. Afterwards, :func:`solve` finds the linear
combination of the saved averages whose averaging profile is closest to that of any other
power EMA, and :func:`reconstruct` writes that combination as a checkpoint, streaming over
the snapshot files.

The averaging profile of a power EMA with exponent :math:`\\gamma` taken at time :math:`t` is

.. math::

    p_{t,\\gamma}(\\tau) = \\frac{\\gamma + 1}{t^{\\gamma + 1}}\\,\\tau^{\\gamma},
    \\qquad 0 \\le \\tau \\le t,

and the averaged weights are :math:`\\int_0^t p_{t,\\gamma}(\\tau)\\,x(\\tau)\\,d\\tau`.
(For a trajectory that is constant over each step, this is exactly the discrete average with
the weights of :func:`polyak.schedules.power`.) Two profiles have the inner product

.. math::

    \\langle p_a, p_b \\rangle
    = \\frac{(\\gamma_a + 1)(\\gamma_b + 1)}{\\gamma_a + \\gamma_b + 1}\\,
      \\frac{m^{\\gamma_a + \\gamma_b + 1}}{t_a^{\\gamma_a + 1}\\,t_b^{\\gamma_b + 1}},
    \\qquad m = \\min(t_a, t_b),

so the least-squares fit :math:`\\min_c \\lVert \\sum_i c_i p_i - p_{target} \\rVert_2` solves
the normal equations :math:`A c = b` with :math:`A_{ij} = \\langle p_i, p_j \\rangle` and
:math:`b_i = \\langle p_i, p_{target} \\rangle`. As in the paper, the coefficients are then
scaled to sum to 1 so that the result is an average.

References:
    Karras, Aittala, Lehtinen, Hellsten, Aila, Laine, `Analyzing and Improving the Training
    Dynamics of Diffusion Models <https://arxiv.org/abs/2312.02696>`_, CVPR 2024 (section 3
    and appendix C).
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from polyak._deprecation import renamed
from polyak._errors import EmptyInputError, PolyakError, ScheduleError, WeightsError
from polyak.schedules import power, sigma_rel_to_gamma

__all__ = [
    "profile",
    "solve",
    "snapshot_metadata",
    "save_snapshot",
    "find_snapshots",
    "reconstruct",
    "T_KEY",
    "GAMMA_KEY",
]


def profile(t: float, gamma: float, tau: ArrayLike) -> np.ndarray:
    """Averaging profile of a power EMA with exponent ``gamma`` taken at step ``t``.

    :math:`p(\\tau) = (\\gamma + 1) / t^{\\gamma + 1} \\cdot \\tau^{\\gamma}` on
    :math:`[0, t]` and 0 after ``t``: how much the average taken at ``t`` weighs the
    training weights of time ``tau``. It integrates to 1 over ``[0, t]``.

    Args:
        t: Step at which the average is taken (> 0).
        gamma: Exponent of the power EMA (> -1).
        tau: Times at which to evaluate the profile.

    Returns:
        float64 array shaped like ``tau``.

    Raises:
        ScheduleError: ``t`` or ``gamma`` out of range.

    Example:
        >>> float(profile(10.0, 1.0, 5.0))
        0.1
    """
    t, gamma = _check_t_gamma(t, gamma, "t", "gamma")
    tau = np.asarray(tau, dtype=np.float64)
    inside = (tau >= 0.0) & (tau <= t)
    # tau / t first so that large t**(gamma+1) cannot overflow.
    scaled = np.where(inside, np.clip(tau, 0.0, t) / t, 0.0)
    return np.where(inside, (gamma + 1.0) / t * scaled**gamma, 0.0)


def _profile_dot(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """Closed-form inner product of power profiles (broadcasting), as derived in the module doc."""
    # Rewritten as (m/t_a)**(g_a+1) * (m/t_b)**(g_b+1) / m, whose ratios are <= 1: the
    # literal t**(gamma+1) overflows float64 for t ~ 1e6 steps and gamma ~ 50.
    m = np.minimum(t_a, t_b)
    scale = (g_a + 1.0) * (g_b + 1.0) / (g_a + g_b + 1.0)
    return scale * (m / t_a) ** (g_a + 1.0) * (m / t_b) ** (g_b + 1.0) / m


@renamed(target_sigma_rel="sigma_rel", target_t="t")
def solve(
    snapshots: Sequence[tuple[float, float]],
    sigma_rel: float | Sequence[float],
    t: float | None = None,
) -> np.ndarray:
    """Coefficients that best reconstruct a power EMA of another length from saved ones.

    Least squares in function space between averaging profiles (see the module
    documentation for the closed-form inner products), then each column scaled to sum to 1,
    as in Karras et al. (2024). The coefficients are float64 and may be negative; use them
    with ``normalize=False`` (:func:`polyak.average`, the streaming merge).

    Args:
        snapshots: The saved averages as ``(t, gamma)`` pairs: the step at which each was
            saved and the exponent of its power EMA (> -0.5, which every ``sigma_rel`` in
            range gives). No pair may appear twice.
        sigma_rel: Relative standard deviation of the wanted average's profile, in
            ``(0, 0.2887)``; a sequence gives several targets at once. (Formerly
            ``target_sigma_rel``, deprecated.)
        t: Step at which the wanted average is taken; defaults to the largest ``t`` among
            the snapshots, and may not exceed it (the profile there would cover training
            steps no snapshot has seen). (Formerly ``target_t``, deprecated.)

    Returns:
        For a single ``sigma_rel``, an array of shape ``(len(snapshots),)``; for a sequence
        of them, shape ``(len(snapshots), len(sigma_rel))``, one column per target. Each
        column sums to 1.

    Raises:
        EmptyInputError: ``snapshots`` or ``sigma_rel`` is empty.
        ScheduleError: a ``t``/``gamma``/``sigma_rel`` out of range, a duplicated snapshot, or
            ``t`` beyond the last snapshot.
        WeightsError: the snapshots cannot reproduce the target (the fitted coefficients sum
            to zero or are not finite).

    Example:
        >>> from polyak.schedules import sigma_rel_to_gamma
        >>> snaps = [(t, sigma_rel_to_gamma(s)) for t in (500, 1000) for s in (0.05, 0.10)]
        >>> c = solve(snaps, 0.10)
        >>> np.round(c, 6) + 0.0  # the last snapshot is exactly the target
        array([0., 0., 0., 1.])
    """
    t_in, g_in = _check_snapshots(snapshots)
    sigmas, single = _targets(sigma_rel)
    g_out = np.array([sigma_rel_to_gamma(s) for s in sigmas], dtype=np.float64)
    last = float(t_in.max())
    if t is None:
        t_target = last
    else:
        t_target, _ = _check_t_gamma(t, 0.0, "t", "gamma")
        if t_target > last:
            raise ScheduleError(
                f"t={t} is after the last snapshot (t={last:g}); the average there would "
                "need training weights that no snapshot has seen"
            )
    t_out = np.full_like(g_out, t_target)

    gram = _profile_dot(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    rhs = _profile_dot(t_in[:, None], g_in[:, None], t_out[None, :], g_out[None, :])
    # A pseudo-inverse (eigenvalues below n * eps of the largest dropped), not solve: nearly
    # equal snapshots (two averages with almost the same t and gamma) make the Gram matrix
    # numerically singular, and solve then returns huge coefficients of opposite signs
    # (~1e4) that amplify every rounding of the merge, where this gives the minimum-norm
    # least-squares fit. On well-conditioned Gram matrices (cond ~1e5-1e9 for snapshots
    # every 1-5% of training) both agree to rounding. One matrix-vector product per target,
    # so that a target's coefficients do not depend on which others are solved with it.
    try:
        pinv = np.linalg.pinv(gram, rcond=len(gram) * np.finfo(np.float64).eps, hermitian=True)
    except np.linalg.LinAlgError:
        raise WeightsError(
            "the least-squares fit of the snapshot profiles did not converge for snapshots "
            f"{list(zip(t_in.tolist(), g_in.tolist(), strict=True))}"
        ) from None
    coef = np.stack([pinv @ rhs[:, k] for k in range(rhs.shape[1])], axis=1)
    total = coef.sum(axis=0)
    if not (np.all(np.isfinite(coef)) and np.all(total != 0.0)):
        raise WeightsError(
            f"cannot reconstruct sigma_rel={sigmas} at t={t_target:g} from these snapshots: "
            f"the fitted coefficients sum to {total.tolist()}"
        )
    coef = coef / total
    return coef[:, 0] if single else coef


def _targets(sigma_rel: Any) -> tuple[list[Any], bool]:
    """The target ``sigma_rel`` values as a list, and whether a single number was given."""
    single = isinstance(sigma_rel, numbers.Real) or (
        isinstance(sigma_rel, np.ndarray) and sigma_rel.ndim == 0
    )
    if isinstance(sigma_rel, (str, bytes)) or (not single and not isinstance(sigma_rel, Iterable)):
        raise ScheduleError(
            "sigma_rel must be a number or a sequence of numbers, got "
            f"sigma_rel={sigma_rel!r:.100}"
        )
    if isinstance(sigma_rel, numbers.Real):
        sigmas = [sigma_rel]
    elif single:  # a 0-d array
        sigmas = [float(sigma_rel)]
    else:
        sigmas = list(sigma_rel)
    if not sigmas:
        raise EmptyInputError("sigma_rel is an empty sequence: give at least one value")
    return sigmas, single


def _check_t_gamma(t: object, gamma: object, t_name: str, g_name: str) -> tuple[float, float]:
    try:
        t_f, g_f = float(t), float(gamma)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ScheduleError(
            f"{t_name} and {g_name} must be real numbers, got {t_name}={t!r}, {g_name}={gamma!r}"
        ) from None
    if not (math.isfinite(t_f) and t_f > 0.0):
        raise ScheduleError(f"{t_name} must be a finite number > 0, got {t_name}={t!r}")
    if not (math.isfinite(g_f) and g_f > -1.0):
        raise ScheduleError(f"{g_name} must be a finite number > -1, got {g_name}={gamma!r}")
    return t_f, g_f


def _check_snapshots(snapshots: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    pairs = list(snapshots)
    if not pairs:
        raise EmptyInputError("snapshots is empty: give at least one (t, gamma) pair")
    seen: dict[tuple[float, float], int] = {}
    ts, gs = [], []
    for i, pair in enumerate(pairs):
        try:
            t, gamma = pair
        except (TypeError, ValueError):
            raise ScheduleError(
                f"snapshots[{i}] must be a (t, gamma) pair, got {pair!r}"
            ) from None
        t_f, g_f = _check_t_gamma(t, gamma, f"snapshots[{i}] t", f"snapshots[{i}] gamma")
        if g_f <= -0.5:
            # The profile tau**gamma is then not square-integrable at 0: no least squares.
            raise ScheduleError(
                f"snapshots[{i}] gamma must be > -0.5 for a least-squares fit, got gamma={gamma!r}"
            )
        if (t_f, g_f) in seen:
            raise ScheduleError(
                f"snapshots[{i}] (t={t_f:g}, gamma={g_f:g}) repeats snapshots[{seen[t_f, g_f]}]; "
                "drop the duplicate"
            )
        seen[t_f, g_f] = i
        ts.append(t_f)
        gs.append(g_f)
    return np.array(ts, dtype=np.float64), np.array(gs, dtype=np.float64)


# Metadata keys of a post-hoc snapshot: the averaging time t and the exponent gamma.
T_KEY = "polyak.t"
GAMMA_KEY = "polyak.gamma"
# Metadata keys of a reconstructed average: the profile it was fitted to. Distinct from the
# snapshot keys, so that a reconstruction is never mistaken for a snapshot.
TARGET_SIGMA_REL_KEY = "polyak.posthoc.sigma_rel"
TARGET_GAMMA_KEY = "polyak.posthoc.gamma"
TARGET_T_KEY = "polyak.posthoc.t"


def snapshot_metadata(t: float, gamma: float) -> dict[str, str]:
    """The metadata that marks a saved power-EMA average for :func:`reconstruct`.

    Pass it to :meth:`polyak.SnapshotDir.save` when saving the average: ``t`` is the number
    of updates folded into it (:attr:`polyak.Averager.count`) and ``gamma`` the exponent of
    its :func:`polyak.schedules.power` schedule. Floats are written with ``repr`` so that
    they read back exactly.

    Args:
        t: The averaging time (> 0).
        gamma: The exponent (> -1).

    Returns:
        ``{"polyak.t": ..., "polyak.gamma": ...}``.

    Raises:
        ScheduleError: ``t`` or ``gamma`` out of range.

    Example:
        >>> snapshot_metadata(2000, 6.5)
        {'polyak.t': '2000.0', 'polyak.gamma': '6.5'}
    """
    t_f, g_f = _check_t_gamma(t, gamma, "t", "gamma")
    return {T_KEY: repr(t_f), GAMMA_KEY: repr(g_f)}


def save_snapshot(
    snapshot_dir: str | os.PathLike[str] | Any, averager: Any, step: int | None = None
) -> Path:
    """Save a power-EMA :class:`polyak.Averager`'s average as a post-hoc snapshot.

    Writes ``averager.value`` with :meth:`polyak.SnapshotDir.save`, recording the averager's
    count as ``t`` and its schedule's ``gamma`` (:func:`snapshot_metadata`).

    Args:
        snapshot_dir: A :class:`polyak.SnapshotDir` or a directory path; keep one directory
            per tracked EMA.
        averager: An averager whose schedule is :func:`polyak.schedules.power`, updated
            since the start of training.
        step: The step in the file name; defaults to ``averager.count``.

    Returns:
        The path of the snapshot file.

    Raises:
        ScheduleError: the averager's schedule is not a power EMA.
        EmptyInputError: the averager has seen no update yet.

    Example:
        >>> import numpy as np, tempfile, polyak
        >>> ema = polyak.Averager(polyak.schedules.power(sigma_rel=0.1))
        >>> ema.update({"w": np.ones(2, np.float32)})
        >>> path = polyak.posthoc.save_snapshot(tempfile.mkdtemp(), ema)
        >>> polyak.safetensors.read_metadata(path)["polyak.t"]
        '1.0'
    """
    from polyak._snapshots import SnapshotDir

    schedule = averager.schedule
    if schedule.name != "power":
        raise ScheduleError(
            f"post-hoc snapshots hold power EMAs; this averager's schedule is {schedule!r} "
            "(use polyak.schedules.power(sigma_rel=...))"
        )
    if averager.count == 0:
        raise EmptyInputError("the averager has no average yet: update it before saving")
    sd = snapshot_dir if isinstance(snapshot_dir, SnapshotDir) else SnapshotDir(snapshot_dir)
    meta = snapshot_metadata(averager.count, schedule.params["gamma"])
    return sd.save(averager.value, averager.count if step is None else step, metadata=meta)


def find_snapshots(
    snapshot_dir: str | os.PathLike[str] | Any | Sequence[str | os.PathLike[str] | Any],
) -> list[tuple[Path, float, float]]:
    """The post-hoc snapshots in one or more snapshot directories, with their ``t``/``gamma``.

    A directory that holds no ``snapshot-*.safetensors`` file itself is searched one level
    down, so that ``run/ema`` with ``run/ema/sigma-0.05`` and ``run/ema/sigma-0.10`` (one
    :class:`polyak.SnapshotDir` per tracked average) can be given as one directory.

    Args:
        snapshot_dir: A directory path or :class:`polyak.SnapshotDir`, or a sequence of them.

    Returns:
        ``(path, t, gamma)`` for every snapshot file, sorted by ``t`` then ``gamma``.

    Raises:
        EmptyInputError: no snapshot file was found.
        PolyakError: a snapshot's metadata lacks ``t``/``gamma`` (the file is named).

    Example:
        >>> import numpy as np, os, tempfile, polyak
        >>> root = tempfile.mkdtemp()
        >>> for s in (0.05, 0.10):
        ...     ema = polyak.Averager(polyak.schedules.power(sigma_rel=s))
        ...     snaps = polyak.SnapshotDir(os.path.join(root, f"sigma-{s}"))
        ...     for step in range(1, 21):
        ...         ema.update({"w": np.full(2, float(step), np.float32)})
        ...         if step % 10 == 0:
        ...             _ = polyak.posthoc.save_snapshot(snaps, ema, step)
        >>> [(t, round(g, 2)) for _, t, g in polyak.posthoc.find_snapshots(root)]
        [(10.0, 6.94), (10.0, 16.97), (20.0, 6.94), (20.0, 16.97)]
    """
    from polyak import safetensors as st
    from polyak._snapshots import SnapshotDir

    dirs = snapshot_dir if isinstance(snapshot_dir, (list, tuple)) else [snapshot_dir]
    paths: list[Path] = []
    for d in dirs:
        sd = d if isinstance(d, SnapshotDir) else SnapshotDir(d)
        found = sd.paths()
        if not found and sd.path.is_dir():
            for sub in sorted(p for p in sd.path.iterdir() if p.is_dir()):
                found.extend(SnapshotDir(sub).paths())
        paths.extend(found)
    if not paths:
        raise EmptyInputError(
            f"no snapshot-*.safetensors file in {[str(getattr(d, 'path', d)) for d in dirs]} "
            "or its immediate subdirectories"
        )
    out = []
    for path in paths:
        meta = st.read_metadata(path) or {}
        if "polyak" in meta:
            # A merge output (it carries the merge record) may carry its first input's t and
            # gamma (a plain merge keeps the first input's metadata), which do not describe
            # its own profile.
            raise PolyakError(
                f"{path} is the output of a merge, not a post-hoc snapshot; keep merged or "
                "reconstructed files out of the snapshot directories"
            )
        if T_KEY not in meta or GAMMA_KEY not in meta:
            raise PolyakError(
                f"{path}: metadata has no {T_KEY!r}/{GAMMA_KEY!r}; save post-hoc snapshots "
                "with SnapshotDir.save(params, step, metadata=polyak.posthoc.snapshot_metadata("
                "averager.count, gamma))"
            )
        try:
            t, gamma = _check_t_gamma(meta[T_KEY], meta[GAMMA_KEY], T_KEY, GAMMA_KEY)
        except ScheduleError as err:
            raise ScheduleError(f"{path}: {err}") from None
        out.append((path, t, gamma))
    out.sort(key=lambda entry: (entry[1], entry[2], str(entry[0])))
    return out


def reconstruct(
    snapshot_dir: str | os.PathLike[str] | Any | Sequence[str | os.PathLike[str] | Any],
    output: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    sigma_rel: float | Sequence[float],
    t: float | None = None,
    *,
    dtype: Any = None,
    accumulate_dtype: Any = None,
    threads: int | None = None,
    progress: Any = None,
) -> np.ndarray:
    """Write the power EMA of any ``sigma_rel`` reconstructed from saved post-hoc snapshots.

    Reads ``t`` and ``gamma`` from every snapshot's metadata (see :func:`snapshot_metadata`),
    computes the coefficients with :func:`solve`, and runs the streaming safetensors merge
    with ``normalize=False``. Each output's metadata records its target
    (``"polyak.posthoc.sigma_rel"``, ``"polyak.posthoc.gamma"``, ``"polyak.posthoc.t"``) in
    place of the snapshots' ``t``, ``gamma`` and step. Several ``sigma_rel`` values are
    written in one pass over the snapshot files (:func:`polyak.safetensors.merge_many`); each
    output appears atomically.

    Args:
        snapshot_dir: Where the snapshots are (see :func:`find_snapshots`).
        output: The output ``.safetensors`` path (a directory for a sharded checkpoint); a
            sequence of them, one per value, when ``sigma_rel`` is a sequence.
        sigma_rel: The wanted relative width(s), each in ``(0, 0.2887)``.
        t: The step to reconstruct at; defaults to the last snapshot's ``t``.
        dtype: Cast float tensors of the outputs (e.g. ``"bfloat16"``).
        accumulate_dtype: Raise the accumulation precision (``"float64"``).
        threads: Worker threads of the merge.
        progress: ``True`` for a progress bar, as in :func:`polyak.safetensors.merge`.

    Returns:
        The coefficients, as :func:`solve` returns them (one column per ``sigma_rel`` when a
        sequence is given), in the order of :func:`find_snapshots`.

    Raises:
        EmptyInputError: no snapshots.
        PolyakError: snapshot metadata missing, ``output`` not matching ``sigma_rel``, bad
            ``sigma_rel``/``t`` (:func:`solve`), or any error of the merge.

    Example:
        >>> import numpy as np, os, tempfile, polyak
        >>> root = tempfile.mkdtemp()
        >>> for s in (0.05, 0.10):
        ...     avg = polyak.Averager(polyak.schedules.power(sigma_rel=s))
        ...     snaps = polyak.SnapshotDir(os.path.join(root, f"sigma-{s}"))
        ...     for step in range(1, 101):
        ...         avg.update({"w": np.full(3, float(step), np.float32)})
        ...         if step % 20 == 0:
        ...             _ = polyak.posthoc.save_snapshot(snaps, avg, step)
        >>> out = os.path.join(root, "ema-0.08.safetensors")
        >>> coef = polyak.posthoc.reconstruct(root, out, sigma_rel=0.08)
        >>> round(float(polyak.safetensors.load(out)["w"][0]), 1)
        91.6
        >>> w = polyak.schedules.power(sigma_rel=0.08).weights(100)  # tracked directly:
        >>> round(float(w @ np.arange(1, 101)), 1)
        91.8
    """
    from polyak import safetensors as st
    from polyak._snapshots import STEP_KEY

    single = isinstance(sigma_rel, numbers.Real)
    outputs = [output] if single else output
    if isinstance(outputs, (str, os.PathLike)) or len(outputs) != (  # type: ignore[arg-type]
        1 if single else len(sigma_rel)  # type: ignore[arg-type]
    ):
        raise PolyakError(
            f"give one output per sigma_rel: sigma_rel={sigma_rel!r}, output={output!r}"
        )
    found = find_snapshots(snapshot_dir)
    coef = solve([(t_i, g_i) for _, t_i, g_i in found], sigma_rel, t)
    columns = coef[:, None] if single else coef
    sigmas = [float(sigma_rel)] if single else [float(s) for s in sigma_rel]  # type: ignore[union-attr]
    t_target = float(t) if t is not None else max(t_i for _, t_i, _ in found)
    # Each output describes its own profile: the first snapshot's metadata without the keys
    # that describe that snapshot (its t, gamma and step), plus the target's.
    base = {
        k: v
        for k, v in (st.read_metadata(found[0][0]) or {}).items()
        if k not in (T_KEY, GAMMA_KEY, STEP_KEY)
    }
    metadata = [
        {
            **base,
            TARGET_SIGMA_REL_KEY: repr(s),
            TARGET_GAMMA_KEY: repr(float(sigma_rel_to_gamma(s))),
            TARGET_T_KEY: repr(t_target),
        }
        for s in sigmas
    ]
    with warnings.catch_warnings():
        # Snapshots from several directories share file names; with explicit coefficients
        # their order does not matter, so the merge's natural-order warning is noise here.
        warnings.simplefilter("ignore", st.OrderWarning)
        st.merge_many(
            [p for p, _, _ in found],
            [Path(o) for o in outputs],  # type: ignore[union-attr]
            [columns[:, k] for k in range(columns.shape[1])],
            normalize=False,
            dtype=dtype,
            accumulate_dtype=accumulate_dtype,
            threads=threads,
            progress=progress,
            schedules=[power(sigma_rel=s) for s in sigmas],
            metadata=metadata,
        )
    return coef
