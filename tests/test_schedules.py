"""Schedules: closed forms, online == offline, names, validation."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import builtin_schedules, fold, online_schedules

import polyak
from polyak import schedules as S


@given(online_schedules(), st.integers(1, 60))
def test_online_fold_reproduces_offline_weights(schedule, n):
    np.testing.assert_allclose(fold(schedule, n), schedule.weights(n), rtol=1e-10, atol=1e-14)


@given(builtin_schedules(), st.integers(1, 60))
def test_builtin_weights_are_normalized(schedule, n):
    w = schedule.weights(n)
    assert w.dtype == np.float64 and w.shape == (n,)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert math.isclose(w.sum(), 1.0, rel_tol=0, abs_tol=1e-12)
    np.testing.assert_array_equal(polyak.weights(schedule, n), w)


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_closed_forms_against_plain_formulas(n):
    k = np.arange(1, n + 1)
    np.testing.assert_allclose(S.equal().weights(n), np.full(n, 1 / n))
    np.testing.assert_allclose(S.linear().weights(n), k / k.sum())
    # The tutorial: newest-first exp(-i/alpha), i = 1..n, normalized.
    newest_first = np.array([math.exp(-i / 2.0) for i in range(1, n + 1)])
    np.testing.assert_allclose(
        S.exponential(2.0).weights(n), (newest_first / newest_first.sum())[::-1]
    )
    # The tutorial's linear: [i/n for i in range(n, 0, -1)] newest-first.
    tut = np.array([i / n for i in range(n, 0, -1)])
    np.testing.assert_allclose(S.linear().weights(n), (tut / tut.sum())[::-1])
    d = 0.9
    ema = [d ** (n - 1)] + [(1 - d) * d ** (n - j) for j in range(2, n + 1)]
    np.testing.assert_allclose(S.ema(d).weights(n), ema)
    g = 2.5
    power = [(j ** (g + 1) - (j - 1) ** (g + 1)) / n ** (g + 1) for j in range(1, n + 1)]
    np.testing.assert_allclose(S.power(g).weights(n), power)


def test_ema_matches_torch_style_update_loop():
    # The EMA exactly as torch's get_ema_avg_fn applies it: avg = decay*avg + (1-decay)*x,
    # starting from a copy of the first model.
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(12, 5))
    avg = xs[0].copy()
    for x in xs[1:]:
        avg = 0.99 * avg + 0.01 * x
    np.testing.assert_allclose(S.ema(0.99).weights(12) @ xs, avg, rtol=1e-12)


def test_polynomial_decay_formula():
    s = S.polynomial(3.0)
    assert s.decay(1) == 0.0
    assert s.decay(5) == pytest.approx(1 - 4 / 8)
    np.testing.assert_allclose(S.polynomial(0.0).weights(6), np.full(6, 1 / 6))


def test_ema_warmup_step_convention():
    s = S.ema_warmup(decay=0.9999, inv_gamma=1.0, power=2 / 3)
    for t in [1, 2, 3, 10, 1000, 10**7]:
        expected = min(max(1 - (1 + (t - 1) / 1.0) ** (-2 / 3), 0.0), 0.9999)
        assert s.decay(t) == pytest.approx(expected, rel=1e-15)
    assert s.decay(1) == 0.0  # the first update copies
    assert S.ema_warmup(decay=0.9, power=1.0, min_decay=0.3).decay(2) == 0.5
    assert S.ema_warmup(decay=0.9, power=1.0, min_decay=0.6).decay(2) == 0.6
    assert S.ema_warmup(decay=0.9, power=1.0).decay(10**6) == 0.9


def test_tail_and_swa():
    np.testing.assert_array_equal(S.tail(3).weights(2), [0.5, 0.5])
    np.testing.assert_allclose(S.tail(fraction=0.1).weights(30)[-4:], [0, 1 / 3, 1 / 3, 1 / 3])
    assert not S.tail(3).online
    with pytest.raises(polyak.NoOnlineFormError, match="SnapshotDir"):
        S.tail(3).decay(2)
    # Before start, offline as online: all the weight on the newest snapshot.
    np.testing.assert_array_equal(S.swa(3).weights(3), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(S.swa(3).weights(1), [1.0])
    # Online, before start the average is the newest snapshot (decay 0).
    assert [S.swa(2).decay(t) for t in (1, 2, 3, 4, 5)] == [0.0, 0.0, 0.0, 0.5, 2 / 3]


@pytest.mark.parametrize(
    "schedule",
    [
        S.equal(),
        S.linear(),
        S.exponential(3.0),
        S.ema(0.8),
        S.polynomial(2.0),
        S.power(sigma_rel=0.1),
        S.ema_warmup(0.99),
        *[S.swa(start) for start in range(8)],
    ],
    ids=repr,
)
def test_fold_equals_weights_for_every_n(schedule):
    # SWA included for n <= start (item 7 of issue 10: it used to raise offline).
    for n in range(1, 25):
        np.testing.assert_allclose(fold(schedule, n), schedule.weights(n), rtol=1e-12, atol=0)


def test_swa_before_start_online_equals_offline():
    xs = [{"w": np.array([float(i), -2.0 * i])} for i in range(1, 6)]
    for start in range(7):
        for n in range(1, len(xs) + 1):
            avg = polyak.Averager(S.swa(start))
            for x in xs[:n]:
                avg.update(x)
            np.testing.assert_allclose(
                avg.value["w"], polyak.average(xs[:n], S.swa(start))["w"], rtol=1e-15
            )


def test_sigma_rel_matches_edm2_examples():
    # Karras et al. 2024: sigma_rel = 0.05 and 0.10 correspond to gamma = 16.97 and 6.94.
    assert S.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert S.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in [0.01, 0.05, 0.1, 0.2, 0.28]:
        assert S.gamma_to_sigma_rel(S.sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-10)
    for bad in [0.0, -0.1, 0.2887, 0.3, float("nan")]:
        with pytest.raises(polyak.ScheduleError, match="sigma_rel"):
            S.power(sigma_rel=bad)


def test_explicit_and_custom():
    s = S.explicit([1.0, 3.0])
    np.testing.assert_array_equal(s.weights(2), [0.25, 0.75])
    np.testing.assert_array_equal(s.weights(2, normalize=False), [1.0, 3.0])
    np.testing.assert_allclose(fold(S.explicit([0, 2, 1, 1]), 4), [0, 0.5, 0.25, 0.25])
    with pytest.raises(polyak.WeightsError, match="3 weights but 4 snapshots"):
        S.explicit([1, 2, 3]).weights(4)
    c = S.custom(lambda n: np.arange(n))
    np.testing.assert_allclose(c.weights(3), [0, 1 / 3, 2 / 3])
    assert not c.online
    with pytest.raises(polyak.WeightsError, match="not finite"):
        S.custom(lambda n: [np.nan] * n).weights(2)
    with pytest.raises(polyak.WeightsError, match="sum to"):
        S.explicit([1, -1]).weights(2)
    with pytest.raises(polyak.WeightsError, match="expected 3 weights"):
        S.custom(lambda n: [1.0]).weights(3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: S.ema(1.5), r"decay in \[0.0, 1.0\], got decay=1.5"),
        (lambda: S.ema("x"), "needs a number decay"),
        (lambda: S.exponential(0), r"alpha in \(0.0"),
        (lambda: S.tail(), "exactly one of k or fraction"),
        (lambda: S.tail(0), "integer k >= 1"),
        (lambda: S.tail(fraction=0), "fraction"),
        (lambda: S.swa(-1), "start >= 0"),
        (lambda: S.polynomial(-1), "eta"),
        (lambda: S.power(), "exactly one of gamma or sigma_rel"),
        (lambda: S.power(-1), "gamma"),
        (lambda: S.ema_warmup(min_decay=1.0, decay=0.5), "min_decay"),
        (lambda: S.explicit([]), "non-empty"),
        (lambda: S.explicit([1, np.inf]), "not finite"),
        (lambda: S.custom(3), "callable"),
        (lambda: S.get("nope"), "unknown schedule 'nope'; known schedules: equal"),
        (lambda: S.get("ema"), "schedule 'ema'.*decay"),
        (lambda: S.resolve(3.5), "schedule must be"),
        (lambda: S.equal().weights(0), "n=0"),
        (lambda: S.equal().decay(0), "t >= 1"),
    ],
)
def test_bad_schedule_arguments(call, match):
    with pytest.raises(polyak.PolyakError, match=match):
        call()


def test_names_repr_equality_and_spec_round_trip():
    assert S.get("EMA", decay=0.5) == S.ema(0.5)
    assert S.get("ema-warmup") == S.ema_warmup()
    assert repr(S.tail(fraction=0.25)) == "tail(fraction=0.25)"
    assert repr(S.ema(0.999)) == "ema(decay=0.999)"
    assert S.resolve(None) == S.equal() == S.resolve("equal")
    assert S.resolve("linear") == S.linear()
    assert S.resolve(S.power(2.0)) == S.power(2.0)
    assert S.ema(0.5) != S.ema(0.6)
    assert len({S.ema(0.5), S.ema(0.5), S.linear()}) == 2
    for s in [
        S.equal(),
        S.exponential(3.0),
        S.tail(k=4),
        S.power(sigma_rel=0.1),
        S.ema_warmup(0.99),
        S.explicit([1, 2, 0, 1, 4]),
        S.swa(3),
        S.polynomial(2.0),
    ]:
        assert S.from_spec(s.name, s.params).weights(5).tolist() == s.weights(5).tolist()
    with pytest.raises(polyak.ScheduleError, match="custom"):
        S.from_spec("custom", {})
    with pytest.raises(AttributeError):
        S.ema(0.5).foo = 1
    assert set(S.names()) >= {
        "equal",
        "linear",
        "exponential",
        "ema",
        "tail",
        "swa",
        "polynomial",
        "power",
        "ema_warmup",
    }
