"""Greedy soups: the toy problem of the issue, the soup's arithmetic and its bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
import weakref

import ml_dtypes
import numpy as np
import pytest

import polyak
from polyak import soup
from polyak._errors import DtypeError, EmptyInputError, PolyakError, ShapeError, StructureError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- a toy problem: softmax regression fine-tuned from one start, plus one diverged run ----


def _data(seed: int, n: int, rng_centers: np.random.Generator):
    centers = rng_centers.normal(scale=1.2, size=(4, 12))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=n)
    x = centers[y] + rng.normal(scale=1.6, size=(n, 12))
    return x.astype(np.float32), y


def _loss(params, x, y) -> float:
    logits = x @ params["w"].astype(np.float64) + params["b"].astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def _grad(params, x, y):
    logits = x @ params["w"] + params["b"]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return {"w": x.T @ p / len(y), "b": p.mean(axis=0)}


def _train(params, x, y, lr, steps, seed, batch=32):
    rng = np.random.default_rng(seed)
    params = {k: v.copy() for k, v in params.items()}
    for _ in range(steps):
        idx = rng.integers(0, len(y), size=batch)
        g = _grad(params, x[idx], y[idx])
        for k in params:
            params[k] = (params[k] - lr * g[k]).astype(np.float32)
    return params


@pytest.fixture(scope="module")
def toy():
    centers = np.random.default_rng(0)
    x_train, y_train = _data(1, 2000, centers)
    x_val, y_val = _data(2, 1000, np.random.default_rng(0))
    start = {"w": np.zeros((12, 4), np.float32), "b": np.zeros(4, np.float32)}
    start = _train(start, x_train, y_train, lr=0.1, steps=100, seed=0)
    candidates = [
        _train(start, x_train, y_train, lr=lr, steps=150, seed=seed)
        for seed, lr in enumerate([0.05, 0.2, 0.1, 0.3, 0.15])
    ]
    # A diverged run: a learning rate far too large blows the weights up.
    candidates.insert(2, _train(start, x_train, y_train, lr=400.0, steps=60, seed=9))
    return candidates, (lambda p: _loss(p, x_val, y_val))


def test_greedy_soup_excludes_the_diverged_candidate_and_beats_uniform(toy):
    candidates, val_loss = toy
    individual = [val_loss(c) for c in candidates]
    assert individual[2] > 5 * min(individual)  # the toy really has a diverged candidate

    result = soup.greedy(candidates, val_loss, higher_is_better=False)

    assert 2 not in result.members
    assert result.members[0] == int(np.argmin(individual))
    assert len(result.members) >= 2  # averaging the good ones helps here
    np.testing.assert_allclose(result.individual_scores, individual, rtol=1e-12)
    assert result.scores[-1] <= min(individual)
    assert val_loss(result.params) == result.scores[-1]
    uniform = val_loss(polyak.average(candidates))
    assert uniform > result.scores[-1]
    assert uniform > min(individual)


def test_greedy_soup_params_are_the_mean_of_its_members(toy):
    candidates, val_loss = toy
    result = soup.greedy(candidates, val_loss, higher_is_better=False)
    for key in ("w", "b"):
        ref = np.mean([candidates[i][key].astype(np.float64) for i in result.members], axis=0)
        assert result.params[key].dtype == np.float32
        np.testing.assert_allclose(result.params[key], ref, rtol=2e-6, atol=1e-6)
    # The same arithmetic as the core (members summed in join order, one division).
    core = polyak.average([candidates[i] for i in result.members])
    for key in ("w", "b"):
        np.testing.assert_array_equal(result.params[key], core[key])


def test_scores_are_one_per_step_and_never_get_worse(toy):
    candidates, val_loss = toy
    res = soup.greedy(candidates, lambda p: -val_loss(p))  # higher is better
    assert len(res.scores) == len(candidates)
    assert res.scores[0] == max(res.individual_scores)
    assert all(b >= a for a, b in zip(res.scores, res.scores[1:]))
    assert 2 not in res.members


def test_ties_join_and_worse_candidates_do_not():
    cands = [{"w": np.array([v])} for v in (1.0, 3.0, 2.0, 50.0)]
    calls = []

    def score(p):
        calls.append(float(p["w"][0]))
        return min(-abs(float(p["w"][0]) - 2.0), -0.5)  # flat near the optimum

    res = soup.greedy(cands, score)
    assert res.members[0] == 2  # w = 2 alone is already on the plateau
    # (2 + 1) / 2 = 1.5 scores -0.5 as well: a tie joins; then (2 + 1 + 3) / 3 = 2 joins.
    assert res.members == [2, 0, 1]
    assert res.params["w"][0] == pytest.approx(2.0)
    assert len(calls) == 2 * len(cands) - 1


def test_nan_scores_rank_last_and_never_join():
    cands = [{"w": np.array([1.0])}, {"w": np.array([np.nan])}, {"w": np.array([1.2])}]

    def score(p):
        return -abs(float(p["w"][0]) - 1.1)

    res = soup.greedy(cands, score)
    assert 1 not in res.members
    assert sorted(res.members) == [0, 2]
    assert np.isnan(res.individual_scores[1])
    assert res.params["w"][0] == pytest.approx(1.1)


def test_single_candidate_is_returned_exactly():
    cand = {"w": np.arange(5, dtype=np.float32) / 3, "step": np.array(7)}
    res = soup.greedy([cand], lambda p: 0.0)
    assert res.members == [0] and res.scores == [0.0]
    np.testing.assert_array_equal(res.params["w"], cand["w"])
    assert res.params["step"] == 7


def test_integer_leaves_follow_int_policy():
    cands = [{"w": np.array([float(i)]), "step": np.array(10 * (i + 1))} for i in range(3)]
    # All scores tie: the stable order keeps 0, 1, 2, and every trial joins.
    res = soup.greedy(cands, lambda p: 1.0)
    assert res.members == [0, 1, 2]
    assert int(res.params["step"]) == 10
    res = soup.greedy(cands, lambda p: 1.0, int_policy="last")
    assert int(res.params["step"]) == 30
    res = soup.greedy(cands, lambda p: 1.0, int_policy="average")
    assert int(res.params["step"]) == 20 and res.params["step"].dtype == cands[0]["step"].dtype
    with pytest.raises(DtypeError, match=r"snapshots\[0\]\['step'\]"):
        soup.greedy(cands, lambda p: 1.0, int_policy="error")
    with pytest.raises(PolyakError, match="int_policy"):
        soup.greedy(cands, lambda p: 1.0, int_policy="median")


def test_bfloat16_leaves_accumulate_in_float32_and_keep_their_dtype():
    rng = np.random.default_rng(3)
    cands = [{"w": rng.normal(size=257).astype(ml_dtypes.bfloat16)} for _ in range(4)]
    res = soup.greedy(cands, lambda p: 1.0)
    assert res.members == [0, 1, 2, 3]
    assert res.params["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        res.params["w"].view(np.uint16), polyak.average(cands)["w"].view(np.uint16)
    )
    ref = np.mean([c["w"].astype(np.float64) for c in cands], axis=0)
    # One rounding to bfloat16 (8 bits of mantissa) at the end, not one per addition.
    np.testing.assert_allclose(res.params["w"].astype(np.float64), ref, rtol=2**-8, atol=1e-30)


def test_torch_candidates_stay_torch():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    cands = [
        {"w": torch.randn(5, 3, generator=gen, requires_grad=True), "n": torch.tensor(i)}
        for i in range(3)
    ]
    seen = []

    def score(p):
        seen.append(type(p["w"]))
        return -float(p["w"].detach().abs().sum())

    res = soup.greedy(cands, score)
    assert set(seen) == {torch.Tensor}
    assert isinstance(res.params["w"], torch.Tensor) and res.params["w"].dtype == torch.float32
    members_ref = np.mean([cands[i]["w"].detach().double().numpy() for i in res.members], axis=0)
    np.testing.assert_allclose(res.params["w"].numpy(), members_ref, rtol=1e-6, atol=1e-7)
    assert int(res.params["n"]) == res.members[0]


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_a_complex_leaf_never_pairs_with_a_real_one(library):
    # Drift fix: the array-API path called complex leaves "float", so a torch complex64
    # leaf was summed into a float32 one (and its imaginary part dropped) without an error.
    if library == "torch":
        torch = pytest.importorskip("torch")
        real, cplx = torch.ones(3), torch.ones(3, dtype=torch.complex64)
    else:
        real, cplx = np.ones(3, np.float32), np.ones(3, np.complex64)
    calls = []
    with pytest.raises(DtypeError, match=r"snapshots\[1\]\['w'\].*complex"):
        soup.greedy([{"w": real}, {"w": cplx}], lambda p: calls.append(p) or 1.0)
    assert calls == [{"w": real}]  # refused before the mismatched snapshot is scored


def test_torch_int_average_saturates_at_the_dtype_range():
    # Drift fix: the exact mean of int64 maxima is the maximum, but in float64 it is 2**63,
    # which torch's cast wraps to the minimum; the numpy path clips, and so must this one.
    torch = pytest.importorskip("torch")
    hi, lo = 2**63 - 1, -(2**63)
    cands = [{"w": torch.ones(2), "n": torch.tensor([hi, lo, 5])} for _ in range(3)]
    res = soup.greedy(cands, lambda p: 1.0, int_policy="average")
    assert res.params["n"].dtype == torch.int64
    assert res.params["n"].tolist() == [hi, lo, 5]


def test_jax_candidates_without_x64_warn_nothing():
    jax = pytest.importorskip("jax")
    if jax.config.jax_enable_x64:
        pytest.skip("JAX runs with x64 enabled")
    jnp = jax.numpy
    cands = [{"w": jnp.asarray([1.0 * i, 2.0]), "n": jnp.asarray(i)} for i in (1, 2, 6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = soup.greedy(cands, lambda p: 1.0, int_policy="average", accumulate_dtype="float64")
    assert res.members == [0, 1, 2]
    np.testing.assert_allclose(np.asarray(res.params["w"]), [3.0, 2.0])
    assert int(res.params["n"]) == 3 and res.params["n"].dtype == cands[0]["n"].dtype


def test_checkpoint_paths_are_loaded_one_at_a_time(tmp_path, toy, monkeypatch):
    from polyak import safetensors as pst

    candidates, val_loss = toy
    paths = []
    for i, c in enumerate(candidates):
        paths.append(tmp_path / f"cand{i}.safetensors")
        pst.save(c, paths[-1])
    in_memory = soup.greedy(candidates, val_loss, higher_is_better=False)

    alive: list[weakref.ref] = []
    loads = []
    real_load = pst.load

    def tracking_load(path, *args, **kwargs):
        tree = real_load(path, *args, **kwargs)
        loads.append(str(path))
        alive.extend(weakref.ref(a) for a in tree.values())
        return tree

    peak = []

    def scoring(p):
        # Only the candidate (or trial soup's source) being worked on may still be loaded.
        peak.append(sum(r() is not None for r in alive))
        return val_loss(p)

    monkeypatch.setattr(pst, "load", tracking_load)
    from_files = soup.greedy(paths, scoring, higher_is_better=False)

    assert from_files.members == in_memory.members
    assert from_files.scores == in_memory.scores
    for key in ("w", "b"):
        np.testing.assert_array_equal(from_files.params[key], in_memory.params[key])
    assert sorted(loads) == sorted(str(p) for p in paths * 2)  # twice each, no more
    assert max(peak) <= 2  # one loaded checkpoint's two tensors at a time


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("bad", ["foo", "int32"])
def test_bad_accumulate_dtype_is_refused_before_any_evaluation(library, bad):
    if library == "torch":
        torch = pytest.importorskip("torch")
        cands = [{"w": torch.ones(2) * i} for i in range(3)]
    else:
        cands = [{"w": np.ones(2) * i} for i in range(3)]
    calls = []

    def score(p):
        calls.append(p)
        return 1.0

    with pytest.raises(DtypeError, match="accumulate_dtype"):
        soup.greedy(cands, score, accumulate_dtype=bad)
    assert calls == []


def test_bad_input_names_the_candidate_and_leaf(tmp_path):
    good = {"a": np.zeros(3), "b": {"c": np.ones(2)}}
    with pytest.raises(EmptyInputError, match="snapshots"):
        soup.greedy([], lambda p: 1.0)
    with pytest.raises(StructureError, match=r"snapshots\[1\].*\['b'\]\['d'\]"):
        soup.greedy([good, {"a": np.zeros(3), "b": {"d": np.ones(2)}}], lambda p: 1.0)
    with pytest.raises(ShapeError, match=r"snapshots\[2\]\['b'\]\['c'\].*\(3,\)"):
        soup.greedy([good, good, {"a": np.zeros(3), "b": {"c": np.ones(3)}}], lambda p: 1.0)
    with pytest.raises(DtypeError, match=r"snapshots\[1\]\['a'\]"):
        soup.greedy([good, {"a": np.zeros(3, int), "b": {"c": np.ones(2)}}], lambda p: 1.0)
    with pytest.raises(PolyakError, match=r"evaluate\(snapshots\[0\]\).*'oops'"):
        soup.greedy([good], lambda p: "oops")
    with pytest.raises(PolyakError, match=r"evaluate\(soup \+ snapshots\[1\]\)"):
        soup.greedy([good, good], lambda p: 1.0 if p is good else None)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(PolyakError, match="nope.safetensors"):
        soup.greedy([good, missing], lambda p: 1.0)


_MEMORY_SCRIPT = """
import gc, os, sys
import numpy as np
import psutil
from polyak import safetensors as pst, soup

folder, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
paths = [os.path.join(folder, f"cand{i}.safetensors") for i in range(n)]
for p in paths:
    pst.save({"w": rng.standard_normal(size, dtype=np.float32)}, p)
pst.load(paths[0])  # warm up the reader's imports and buffers
gc.collect()
base = psutil.Process().memory_info().rss
result = soup.greedy(paths, lambda p: float(p["w"][:4096].astype(np.float64).sum()))
# VmHWM, the peak RSS of this process image: unlike ru_maxrss it does not carry over the
# parent's (pytest's) peak from before exec.
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(peak - base, len(result.members))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc/self/status")
def test_soup_of_checkpoints_peak_memory_is_a_few_checkpoints_not_all(tmp_path):
    pytest.importorskip("psutil")
    n, size = 12, 4 * 2**20  # 12 checkpoints of 16 MiB
    one = 4 * size
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path), str(n), str(size)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    assert proc.returncode == 0, proc.stderr
    grown, members = (int(x) for x in proc.stdout.split())
    # Running sum, trial sum, trial soup, one loaded candidate and temporaries: about four
    # checkpoints, whatever n is; holding the candidates would take n = 12.
    assert grown < 6 * one, f"peak grew by {grown / 2**20:.0f} MiB"


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(soup, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_the_old_candidates_keyword_warns_and_still_works():
    snaps = [{"w": np.array([1.0])}, {"w": np.array([3.0])}, {"w": np.array([99.0])}]
    score = lambda p: 10.0 - abs(float(p["w"][0]) - 2.0)  # noqa: E731
    want = soup.greedy(snaps, score)
    with pytest.warns(DeprecationWarning, match="candidates= is deprecated.*snapshots="):
        got = soup.greedy(candidates=snaps, evaluate=score)
    assert got.members == want.members == [0, 1] and got.scores == want.scores
    np.testing.assert_array_equal(got.params["w"], want.params["w"])


def test_the_load_seam_reads_any_kind_of_snapshot():
    # Snapshots given by name, loaded by a user function one at a time, twice each.
    store = {
        "a": {"w": np.array([1.0])},
        "b": {"w": np.array([3.0])},
        "c": {"w": np.array([99.0])},
    }
    calls = []

    def load(name):
        calls.append(name)
        return store[name]

    res = soup.greedy(["a", "b", "c"], lambda p: -abs(float(p["w"][0]) - 2.0), load=load)
    assert res.members == [0, 1] and res.params["w"].tolist() == [2.0]
    assert sorted(calls) == ["a", "a", "b", "b", "c", "c"]
    with pytest.raises(ShapeError, match=r"runs\[1\]\['w'\]"):
        soup.greedy(
            ["a", "b"],
            lambda p: 1.0,
            load=lambda n: store[n] if n == "a" else {"w": np.ones(2)},
            name="runs",
        )
