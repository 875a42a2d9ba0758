"""Post-hoc EMA: the power schedule against the paper, and the profile least squares."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyak import posthoc
from polyak._errors import EmptyInputError, PolyakError, ScheduleError
from polyak.schedules import gamma_to_sigma_rel, power, sigma_rel_to_gamma


def _gauss_integral(f, a: float, b: float, n: int = 400) -> float:
    """Gauss-Legendre quadrature of f on [a, b]: an independent check of the closed forms."""
    x, w = np.polynomial.legendre.leggauss(n)
    tau = 0.5 * (b - a) * x + 0.5 * (b + a)
    return float(0.5 * (b - a) * np.sum(w * f(tau)))


# --- the power schedule (written in the core) against the paper --------------------------


@pytest.mark.parametrize(("sigma_rel", "gamma"), [(0.05, 16.97), (0.10, 6.94)])
def test_sigma_rel_to_gamma_matches_paper_examples(sigma_rel, gamma):
    # Karras et al. 2024, section 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert round(sigma_rel_to_gamma(sigma_rel), 2) == gamma
    assert power(sigma_rel=sigma_rel).params["gamma"] == pytest.approx(
        sigma_rel_to_gamma(sigma_rel), rel=1e-12
    )


@pytest.mark.parametrize("sigma_rel", [0.01, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.25, 0.28])
def test_sigma_rel_gamma_round_trip_and_is_the_profile_std(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-8)
    # sigma_rel is the standard deviation of the profile on [0, 1] (its definition in the
    # paper), computed here by quadrature instead of by the cubic.
    mean = _gauss_integral(lambda u: u * posthoc.profile(1.0, gamma, u), 0.0, 1.0)
    second = _gauss_integral(lambda u: u * u * posthoc.profile(1.0, gamma, u), 0.0, 1.0)
    assert math.sqrt(second - mean**2) == pytest.approx(sigma_rel, rel=1e-8)


@pytest.mark.parametrize("bad", [0.0, -0.05, 0.2887, 0.29, 0.5, float("nan"), float("inf")])
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(ScheduleError, match="sigma_rel"):
        sigma_rel_to_gamma(bad)
    with pytest.raises(ScheduleError, match="sigma_rel"):
        power(sigma_rel=bad)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 6.94, 16.97])
@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_power_weights_match_folding_decay(gamma, n):
    sched = power(gamma)
    # Fold avg_t = decay(t) avg_{t-1} + (1 - decay(t)) x_t on unit vectors: the weight each
    # x_k ends up with, which must equal the offline closed form.
    folded = np.zeros(n)
    folded[0] = 1.0
    for t in range(2, n + 1):
        d = sched.decay(t)
        assert d == pytest.approx((1 - 1 / t) ** (gamma + 1), rel=1e-14)
        folded[:t] *= d
        folded[t - 1] += 1.0 - d
    k = np.arange(1, n + 1, dtype=np.float64)
    paper = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / n ** (gamma + 1)
    np.testing.assert_allclose(sched.weights(n), paper, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(sched.weights(n), folded, rtol=1e-10, atol=1e-15)


# --- profiles and their inner products --------------------------------------------------


@pytest.mark.parametrize(("t", "gamma"), [(1.0, 0.0), (50.0, 6.94), (2000.0, 16.97), (7.0, 0.3)])
def test_profile_is_a_density_on_zero_to_t(t, gamma):
    assert _gauss_integral(lambda u: posthoc.profile(t, gamma, u), 0.0, t) == pytest.approx(1.0)
    assert posthoc.profile(t, gamma, t) == pytest.approx((gamma + 1) / t)
    np.testing.assert_array_equal(posthoc.profile(t, gamma, [t * 1.01, 2 * t, -1.0]), 0.0)


@pytest.mark.parametrize(
    ("t_a", "g_a", "t_b", "g_b"),
    [
        (100.0, 6.94, 100.0, 6.94),
        (50.0, 16.97, 2000.0, 6.94),
        (2000.0, 16.97, 50.0, 6.94),
        (1234.0, 0.5, 987.0, 3.0),
        (3.0, 0.0, 5.0, 0.0),
    ],
)
def test_profile_inner_product_closed_form_matches_quadrature(t_a, g_a, t_b, g_b):
    closed = posthoc._profile_dot(
        np.float64(t_a), np.float64(g_a), np.float64(t_b), np.float64(g_b)
    )
    m = min(t_a, t_b)
    numeric = _gauss_integral(
        lambda u: posthoc.profile(t_a, g_a, u) * posthoc.profile(t_b, g_b, u), 0.0, m
    )
    assert float(closed) == pytest.approx(numeric, rel=1e-9)


def test_profile_inner_product_does_not_overflow_for_long_runs():
    # t**(gamma+1) alone would be inf in float64 here.
    value = posthoc._profile_dot(
        np.float64(5e6), np.float64(60.0), np.float64(4e6), np.float64(60.0)
    )
    assert np.isfinite(value) and value > 0


# --- solve ---------------------------------------------------------------------------------


def _snapshots(every: int = 50, last: int = 2000, sigmas=(0.05, 0.10)):
    return [(t, sigma_rel_to_gamma(s)) for t in range(every, last + 1, every) for s in sigmas]


def test_solve_recovers_a_stored_average_exactly():
    snaps = _snapshots(every=500)
    coef = posthoc.solve(snaps, 0.10)
    expected = np.zeros(len(snaps))
    expected[snaps.index((2000, sigma_rel_to_gamma(0.10)))] = 1.0
    np.testing.assert_allclose(coef, expected, atol=1e-9)
    coef = posthoc.solve(snaps, 0.05, target_t=1000)
    expected = np.zeros(len(snaps))
    expected[snaps.index((1000, sigma_rel_to_gamma(0.05)))] = 1.0
    np.testing.assert_allclose(coef, expected, atol=1e-9)


def test_solve_shapes_and_columns_sum_to_one():
    snaps = _snapshots()
    one = posthoc.solve(snaps, 0.08)
    many = posthoc.solve(snaps, [0.05, 0.08, 0.12])
    assert one.shape == (len(snaps),) and one.dtype == np.float64
    assert many.shape == (len(snaps), 3)
    np.testing.assert_allclose(many.sum(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(many[:, 1], one, rtol=1e-10, atol=1e-14)
    assert posthoc.solve(snaps, np.float32(0.08)).shape == (len(snaps),)
    assert posthoc.solve(snaps, (0.08,)).shape == (len(snaps), 1)


def test_solve_is_the_least_squares_fit_of_the_profiles():
    # Independent reference: discretize the profiles on a fine grid and solve the
    # least-squares problem with lstsq, then normalize as solve does.
    snaps = _snapshots(every=400, sigmas=(0.05, 0.10))
    target_g = sigma_rel_to_gamma(0.08)
    tau = np.linspace(0.0, 2000.0, 400_001)[1:]
    dtau = tau[1] - tau[0]
    design = np.stack([posthoc.profile(t, g, tau) for t, g in snaps], axis=1) * np.sqrt(dtau)
    target = posthoc.profile(2000.0, target_g, tau) * np.sqrt(dtau)
    ref, *_ = np.linalg.lstsq(design, target, rcond=None)
    ref /= ref.sum()
    np.testing.assert_allclose(posthoc.solve(snaps, 0.08), ref, rtol=1e-4, atol=1e-6)


def test_reconstructed_discrete_weights_are_close_to_the_target_schedule():
    # The discrete power average at step n weighs x_k by the profile's mass on [k-1, k], so
    # the combination of the stored averages' weight vectors must approach the target's.
    n = 2000
    snaps = _snapshots()
    coef = posthoc.solve(snaps, 0.08)
    combined = np.zeros(n)
    for c, (t, g) in zip(coef, snaps, strict=True):
        combined[:t] += c * power(g).weights(t)
    target = power(sigma_rel=0.08).weights(n)
    spread = np.linalg.norm(power(sigma_rel=0.05).weights(n) - power(sigma_rel=0.10).weights(n))
    assert np.linalg.norm(combined - target) < 1e-3 * spread


def test_solve_bad_input_names_what_is_wrong():
    snaps = _snapshots(every=1000)
    with pytest.raises(EmptyInputError, match="snapshots"):
        posthoc.solve([], 0.08)
    with pytest.raises(EmptyInputError, match="target_sigma_rel"):
        posthoc.solve(snaps, [])
    with pytest.raises(ScheduleError, match="sigma_rel"):
        posthoc.solve(snaps, 0.3)
    with pytest.raises(ScheduleError, match=r"snapshots\[1\]"):
        posthoc.solve([(10, 1.0), (-5, 1.0)], 0.08)
    with pytest.raises(ScheduleError, match=r"snapshots\[1\]"):
        posthoc.solve([(10, 1.0), (20, float("nan"))], 0.08)
    with pytest.raises(ScheduleError, match=r"snapshots\[0\]"):
        posthoc.solve([(10, 1.0, 3)], 0.08)
    with pytest.raises(ScheduleError, match=r"snapshots\[2\].*snapshots\[0\]"):
        posthoc.solve([(10, 1.0), (20, 1.0), (10.0, 1.0)], 0.08)
    with pytest.raises(ScheduleError, match="target_t"):
        posthoc.solve(snaps, 0.08, target_t=2001)
    with pytest.raises(ScheduleError, match="target_t"):
        posthoc.solve(snaps, 0.08, target_t=0)
    with pytest.raises(ScheduleError, match="gamma"):
        posthoc.profile(10.0, -1.0, 1.0)
    assert issubclass(ScheduleError, PolyakError)
