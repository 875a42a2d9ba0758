"""Post-hoc EMA: the power schedule against the paper, and the profile least squares."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import polyak
import polyak.safetensors
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
    coef = posthoc.solve(snaps, 0.05, t=1000)
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


def test_solve_sigma_rel_types():
    snaps = _snapshots(every=500)
    one = posthoc.solve(snaps, 0.08)
    np.testing.assert_array_equal(posthoc.solve(snaps, np.array(0.08)), one)
    np.testing.assert_array_equal(posthoc.solve(snaps, np.array([0.08]))[:, 0], one)
    for bad in (None, "0.08", b"0.08", object()):
        with pytest.raises(ScheduleError, match="sigma_rel must be a number"):
            posthoc.solve(snaps, bad)


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


def test_solve_nearly_equal_snapshots_give_bounded_coefficients():
    # Two snapshots whose profiles differ by 1e-9 in gamma make the Gram matrix numerically
    # singular (cond ~1e16). The fit must stay the least-squares one (checked on a grid, as
    # above) without coefficients of +-1e4 that would amplify the merge's rounding.
    g = sigma_rel_to_gamma(0.10)
    snaps = [(1000, g), (1000, g + 1e-9), (500, g), (500, sigma_rel_to_gamma(0.05))]
    coef = posthoc.solve(snaps, 0.08)
    assert np.max(np.abs(coef)) < 10.0
    assert math.isclose(coef.sum(), 1.0, rel_tol=1e-12)
    tau = np.linspace(0.0, 1000.0, 200_001)[1:]
    design = np.stack([posthoc.profile(t, gg, tau) for t, gg in snaps], axis=1)
    target = posthoc.profile(1000.0, sigma_rel_to_gamma(0.08), tau)
    best = np.linalg.lstsq(design[:, [0, 2, 3]], target, rcond=None)[0]
    best /= best.sum()
    residual = np.linalg.norm(design @ coef - target)
    assert residual <= 1.0001 * np.linalg.norm(design[:, [0, 2, 3]] @ best - target)


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
    with pytest.raises(EmptyInputError, match="sigma_rel is an empty sequence"):
        posthoc.solve(snaps, [])
    with pytest.raises(ScheduleError, match="sigma_rel"):
        posthoc.solve(snaps, 0.3)
    with pytest.raises(ScheduleError, match=r"snapshots\[1\]"):
        posthoc.solve([(10, 1.0), (-5, 1.0)], 0.08)
    with pytest.raises(ScheduleError, match=r"snapshots\[1\]"):
        posthoc.solve([(10, 1.0), (20, float("nan"))], 0.08)
    with pytest.raises(ScheduleError, match=r"snapshots\[0\]"):
        posthoc.solve([(10, 1.0, 3)], 0.08)
    with pytest.raises(ScheduleError, match=r"snapshots\[1\] gamma must be > -0.5"):
        posthoc.solve([(10, 1.0), (20, -0.6)], 0.08)
    with pytest.raises(ScheduleError, match=r"snapshots\[2\].*snapshots\[0\]"):
        posthoc.solve([(10, 1.0), (20, 1.0), (10.0, 1.0)], 0.08)
    with pytest.raises(ScheduleError, match=r"\bt=2001 is after the last snapshot"):
        posthoc.solve(snaps, 0.08, t=2001)
    with pytest.raises(ScheduleError, match=r"\bt must be a finite number > 0"):
        posthoc.solve(snaps, 0.08, t=0)
    with pytest.raises(ScheduleError, match="gamma"):
        posthoc.profile(10.0, -1.0, 1.0)
    assert issubclass(ScheduleError, PolyakError)


# --- reconstruct: snapshots on disk, streaming merge ----------------------------------------

SIZES = {"dense": {"kernel": (200, 300), "bias": (300,)}, "head": {"kernel": (300, 132)}}
SIZES["head"]["bias"] = (100,)  # 60,000 + 300 + 39,600 + 100 = 100,000 parameters


def _random_walk_run(root, sigmas_saved, sigmas_tracked, *, steps, every, seed=0, sizes=SIZES):
    """A noisy random walk of a float32 tree, with power EMAs tracked by polyak.Averager.

    The averages of ``sigmas_saved`` are saved every ``every`` steps to one SnapshotDir each
    (``root/sigma-<s>``); all of them are returned at the end.
    """
    rng = np.random.default_rng(seed)
    params = {
        layer: {name: np.zeros(shape, np.float32) for name, shape in leaves.items()}
        for layer, leaves in sizes.items()
    }
    averagers = {s: polyak.Averager(power(sigma_rel=s)) for s in sigmas_tracked}
    dirs = {s: polyak.SnapshotDir(root / f"sigma-{s}") for s in sigmas_saved}
    for step in range(1, steps + 1):
        for layer in params.values():
            for value in layer.values():
                # Drift plus noise: the weights wander, so the EMA lengths differ visibly.
                value += np.float32(0.01) + rng.standard_normal(value.shape, np.float32)
        for avg in averagers.values():
            avg.update(params)
        if step % every == 0:
            for s, d in dirs.items():
                gamma = averagers[s].schedule.params["gamma"]
                d.save(
                    averagers[s].value,
                    step,
                    metadata=posthoc.snapshot_metadata(averagers[s].count, gamma),
                )
    return {s: avg.value for s, avg in averagers.items()}


def _vector(tree, names) -> np.ndarray:
    """The leaves named ``layer.name`` (safetensors names), as one float64 vector."""
    return np.concatenate(
        [np.asarray(tree[n.split(".")[0]][n.split(".")[1]], np.float64).ravel() for n in names]
    )


def test_reconstruction_of_sigma_0_08_matches_tracking_it(tmp_path, capsys):
    from safetensors.numpy import load_file

    tracked = _random_walk_run(
        tmp_path / "snaps", (0.05, 0.10), (0.05, 0.10, 0.08), steps=2000, every=50
    )
    out = tmp_path / "ema-0.08.safetensors"
    coef = posthoc.reconstruct(tmp_path / "snaps", out, sigma_rel=0.08)
    assert coef.shape == (80,)
    assert coef.sum() == pytest.approx(1.0)

    got = load_file(str(out))  # the official reader, not polyak's
    names = sorted(got)
    assert names == ["dense.bias", "dense.kernel", "head.bias", "head.kernel"]
    assert all(a.dtype == np.float32 for a in got.values())
    recon = np.concatenate([got[n].astype(np.float64).ravel() for n in names])
    assert recon.size == 100_000
    direct = _vector(tracked[0.08], names)
    spread = np.linalg.norm(_vector(tracked[0.05], names) - _vector(tracked[0.10], names))
    err = np.linalg.norm(recon - direct)
    with capsys.disabled():
        print(
            f"\npost-hoc sigma_rel=0.08 from 2 x 40 snapshots: |recon - tracked| = {err:.4g}, "
            f"|ema(0.05) - ema(0.10)| = {spread:.4g}, ratio {err / spread:.3g}"
        )
    assert err < 1e-2 * spread


SMALL = {"dense": {"kernel": (7, 5), "bias": (5,)}, "head": {"kernel": (5, 3), "bias": (3,)}}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    tracked = _random_walk_run(
        root / "snaps", (0.05, 0.10), (0.05, 0.10), steps=300, every=30, sizes=SMALL
    )
    return root / "snaps", tracked


def test_reconstruct_equals_the_in_memory_average_with_the_same_coefficients(small_run, tmp_path):
    from polyak import safetensors as pst

    snaps, _ = small_run
    found = posthoc.find_snapshots(snaps)
    assert [t for _, t, _ in found] == sorted(t for _, t, _ in found)
    assert len(found) == 20 and {round(g, 2) for _, _, g in found} == {16.97, 6.94}
    for t in (None, 150):
        out = tmp_path / f"ema-{t}.safetensors"
        coef = posthoc.reconstruct(snaps, out, sigma_rel=0.08, t=t)
        expected_coef = posthoc.solve([(t_i, g_i) for _, t_i, g_i in found], 0.08, t)
        np.testing.assert_array_equal(coef, expected_coef)
        # The streaming merge shares the core kernel, so it matches average() bit for bit.
        ref = polyak.average([pst.load(p) for p, _, _ in found], coef, normalize=False)
        got = pst.load(out)
        assert got.keys() == ref.keys()
        for name in ref:
            np.testing.assert_array_equal(got[name], ref[name])


def test_several_sigma_rel_are_written_in_one_pass(small_run, tmp_path, monkeypatch):
    from polyak import safetensors as pst

    snaps, _ = small_run
    calls = []
    real = pst.merge_many

    def spy(inputs, outputs, weight_vectors, **kwargs):
        calls.append(len(outputs))
        return real(inputs, outputs, weight_vectors, **kwargs)

    singles = []
    for s in (0.05, 0.08, 0.12):
        singles.append(tmp_path / f"single-{s}.safetensors")
        posthoc.reconstruct(snaps, singles[-1], sigma_rel=s)
    monkeypatch.setattr(pst, "merge_many", spy)
    outs = [tmp_path / f"many-{s}.safetensors" for s in (0.05, 0.08, 0.12)]
    coef = posthoc.reconstruct(snaps, outs, sigma_rel=[0.05, 0.08, 0.12])
    assert calls == [3]
    assert coef.shape == (20, 3)
    for one, many in zip(singles, outs, strict=True):
        a, b = pst.load(one), pst.load(many)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    record = json.loads(pst.read_metadata(outs[1])["polyak"])
    assert record["schedule"]["name"] == "power"
    assert record["schedule"]["params"]["sigma_rel"] == 0.08


def test_reconstructed_files_record_their_target_not_a_snapshot(small_run, tmp_path):
    from polyak import safetensors as pst
    from polyak.schedules import sigma_rel_to_gamma

    snaps, _ = small_run
    found = posthoc.find_snapshots(snaps)
    first = pst.read_metadata(found[0][0])
    assert {posthoc.T_KEY, posthoc.GAMMA_KEY, "polyak.step"} <= first.keys()
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    posthoc.reconstruct(snaps, outs, sigma_rel=[0.05, 0.08], t=150)
    for out, s in zip(outs, (0.05, 0.08), strict=True):
        meta = pst.read_metadata(out)
        assert posthoc.T_KEY not in meta and posthoc.GAMMA_KEY not in meta
        assert "polyak.step" not in meta
        assert float(meta["polyak.posthoc.sigma_rel"]) == s
        assert float(meta["polyak.posthoc.gamma"]) == sigma_rel_to_gamma(s)
        assert float(meta["polyak.posthoc.t"]) == 150.0
        assert json.loads(meta["polyak"])["schedule"]["params"]["sigma_rel"] == s
    # Without t, the target is the last snapshot's.
    posthoc.reconstruct(snaps, outs[0], sigma_rel=0.05)
    assert float(pst.read_metadata(outs[0])["polyak.posthoc.t"]) == max(t for _, t, _ in found)


def test_reconstruct_bad_input(small_run, tmp_path):
    from polyak import safetensors as pst

    snaps, _ = small_run
    with pytest.raises(PolyakError, match="one output per sigma_rel"):
        posthoc.reconstruct(snaps, tmp_path / "a.safetensors", sigma_rel=[0.05, 0.08])
    with pytest.raises(PolyakError, match="one output per sigma_rel"):
        posthoc.reconstruct(snaps, [tmp_path / "a.safetensors"], sigma_rel=[0.05, 0.08])
    with pytest.raises(EmptyInputError, match="no snapshot"):
        posthoc.reconstruct(tmp_path / "empty", tmp_path / "a.safetensors", sigma_rel=0.08)
    with pytest.raises(ScheduleError, match=r"\bt=10000 is after the last snapshot"):
        posthoc.reconstruct(snaps, tmp_path / "a.safetensors", sigma_rel=0.08, t=10_000)
    with pytest.raises(ScheduleError, match="sigma_rel"):
        posthoc.reconstruct(snaps, tmp_path / "a.safetensors", sigma_rel=0.5)
    assert not (tmp_path / "a.safetensors").exists()

    plain = polyak.SnapshotDir(tmp_path / "plain")
    plain.save({"w": np.zeros(3, np.float32)}, 10)
    with pytest.raises(PolyakError, match=r"snapshot-0*10\.safetensors.*polyak\.t"):
        posthoc.reconstruct(plain, tmp_path / "b.safetensors", sigma_rel=0.08)
    bad = polyak.SnapshotDir(tmp_path / "bad")
    bad.save({"w": np.zeros(3, np.float32)}, 10, metadata={"polyak.t": "ten", "polyak.gamma": "1"})
    with pytest.raises(ScheduleError, match=r"snapshot-0*10\.safetensors"):
        posthoc.reconstruct(bad, tmp_path / "b.safetensors", sigma_rel=0.08)

    # A merge output dropped into a snapshot directory carries a copy of the first input's
    # t/gamma: it must be refused, not mistaken for a snapshot.
    mixed = polyak.SnapshotDir(tmp_path / "mixed")
    first = posthoc.find_snapshots(snaps)[0][0]
    mixed.save(pst.load(first), 30, metadata=posthoc.snapshot_metadata(30, 6.94))
    pst.merge([first, first], tmp_path / "mixed" / "snapshot-0000000060.safetensors")
    with pytest.raises(PolyakError, match="output of a merge"):
        posthoc.reconstruct(mixed, tmp_path / "b.safetensors", sigma_rel=0.08)
    assert not (tmp_path / "b.safetensors").exists()


def test_save_snapshot_records_t_and_gamma_of_a_power_averager(tmp_path):
    ema = polyak.Averager(power(sigma_rel=0.07))
    with pytest.raises(EmptyInputError, match="update"):
        posthoc.save_snapshot(tmp_path / "a", ema)
    for i in range(7):
        ema.update({"w": np.full(3, float(i), np.float32)})
    path = posthoc.save_snapshot(tmp_path / "a", ema)
    assert path.name == "snapshot-0000000007.safetensors"
    [(found, t, gamma)] = posthoc.find_snapshots(tmp_path / "a")
    assert found == path and t == 7.0
    assert gamma == sigma_rel_to_gamma(0.07)  # exactly: written with repr
    np.testing.assert_array_equal(polyak.safetensors.load(path)["w"], ema.value["w"])
    posthoc.save_snapshot(polyak.SnapshotDir(tmp_path / "b"), ema, step=70)
    assert polyak.SnapshotDir(tmp_path / "b").steps() == [70]
    with pytest.raises(ScheduleError, match="power"):
        posthoc.save_snapshot(tmp_path / "c", polyak.Averager(polyak.schedules.ema(0.9)))


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(posthoc, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_solve_old_keyword_names_warn_and_still_work():
    snaps = _snapshots(every=500)
    want = posthoc.solve(snaps, sigma_rel=0.08, t=1500)
    with pytest.warns(DeprecationWarning, match="target_sigma_rel= is deprecated.*sigma_rel="):
        got = posthoc.solve(snaps, target_sigma_rel=0.08, t=1500)
    np.testing.assert_array_equal(got, want)
    with pytest.warns(DeprecationWarning, match="target_t= is deprecated.*t="):
        got = posthoc.solve(snaps, 0.08, target_t=1500)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(polyak.PolyakError, match="both target_t= and t="):
        posthoc.solve(snaps, 0.08, target_t=1500, t=1500)
