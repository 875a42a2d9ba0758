"""What a new user trips over (issue 14): ordering, few-checkpoint EMA, models passed as
snapshots, the demo's folder, subcommand errors, loading results into a framework.

Checkpoints are written by the official ``safetensors`` writer; expected values are float64
numpy averages of what the official reader reads back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import polyak
import polyak.safetensors as pst
from polyak.utils import natural_key

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "polyak", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def epochs(folder: Path, numbers: list[int]) -> list[str]:
    """Checkpoints epoch_<n>.safetensors: a float tensor equal to n, and a step counter 20*n."""
    paths = []
    for n in numbers:
        path = folder / f"epoch_{n}.safetensors"
        save_file(
            {"w": np.full((3, 2), float(n), np.float32), "steps": np.array(20 * n, np.int64)},
            str(path),
        )
        paths.append(str(path))
    return paths


def reference(paths: list[str], weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return sum(wi * load_file(p)["w"].astype(np.float64) for wi, p in zip(w, paths))


# --- 1. ordering, and 9. what the order warning says --------------------------------------


@pytest.fixture
def unsorted(tmp_path: Path) -> list[str]:
    # What sorted(glob("epoch_*")) gives: epoch_10 before epoch_8 and epoch_9.
    return sorted(epochs(tmp_path, [8, 9, 10]))


def test_python_merge_warns_about_order_and_names_integer_tensors(unsorted, tmp_path) -> None:
    with pytest.warns(polyak.OrderWarning) as caught:
        pst.merge(unsorted, tmp_path / "out.safetensors", "equal")
    text = str(caught[0].message)
    assert "'epoch_10.safetensors' is given before 'epoch_8.safetensors'" in text
    # Even 'equal' depends on the order: integer tensors come from the last input given.
    assert "integer" in text and "last" in text and "but 'equal'" not in text
    assert "sort='natural'" in text
    # ... which is what happened: the step counter of epoch_9, not of epoch_10.
    assert load_file(str(tmp_path / "out.safetensors"))["steps"] == 180


def test_sort_natural_orders_numbered_names_without_a_warning(unsorted, tmp_path) -> None:
    natural = sorted(unsorted, key=lambda p: natural_key(os.path.basename(p)))
    assert [Path(p).name for p in natural] == [f"epoch_{n}.safetensors" for n in (8, 9, 10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", polyak.OrderWarning)
        report = pst.merge(unsorted, tmp_path / "out.safetensors", "linear", sort="natural")
    out = load_file(str(tmp_path / "out.safetensors"))
    np.testing.assert_allclose(out["w"], reference(natural, [1, 2, 3]), rtol=1e-6)
    assert out["steps"] == 200 and report.weights == pytest.approx((1 / 6, 2 / 6, 3 / 6))


def test_sort_must_be_natural_or_none(unsorted, tmp_path) -> None:
    with pytest.raises(polyak.PolyakError, match="sort='alphabetical'.*'natural'"):
        pst.merge(unsorted, tmp_path / "out.safetensors", sort="alphabetical")


def test_cli_sort_natural(unsorted, tmp_path) -> None:
    warned = cli("merge", *unsorted, "-o", "a.safetensors", "--schedule", "linear", cwd=tmp_path)
    assert warned.returncode == 0 and "not in natural order" in warned.stderr
    assert "integer" in warned.stderr
    quiet = cli("merge", *unsorted, "-o", "b.safetensors", "--schedule", "linear",
                "--sort", "natural", cwd=tmp_path)  # fmt: skip
    assert quiet.returncode == 0 and "natural order" not in quiet.stderr, quiet.stderr
    natural = sorted(unsorted, key=lambda p: natural_key(os.path.basename(p)))
    np.testing.assert_allclose(
        load_file(str(tmp_path / "b.safetensors"))["w"], reference(natural, [1, 2, 3]), rtol=1e-6
    )


def test_glob_examples_sort_naturally() -> None:
    # The docstring and --help examples that glob numbered files order them naturally.
    help_text = cli("merge", "--help", cwd=ROOT).stdout
    for line in help_text.splitlines():
        if "*" in line and line.strip().startswith("polyak merge"):
            assert "--sort natural" in line, line
    assert "--sort natural" in help_text


# --- 2. EMA over a few checkpoints ---------------------------------------------------------


def test_cli_says_when_the_oldest_input_weighs_most(tmp_path) -> None:
    paths = epochs(tmp_path, [1, 2, 3])
    proc = cli("merge", *paths, "-o", "ema.safetensors", "--schedule", "ema", "--decay", "0.9",
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # ema(0.9) over 3 checkpoints: 0.81, 0.09, 0.1 -- the oldest weighs most.
    assert "0.81" in proc.stderr and "oldest" in proc.stderr.lower()
    assert "--schedule exponential" in proc.stderr
    np.testing.assert_allclose(
        load_file(str(tmp_path / "ema.safetensors"))["w"],
        reference(paths, [0.81, 0.09, 0.1]),
        rtol=1e-6,
    )
    recent = cli("merge", *paths, "-o", "exp.safetensors", "--schedule", "exponential",
                 cwd=tmp_path)  # fmt: skip
    assert recent.returncode == 0 and "oldest" not in recent.stderr.lower(), recent.stderr


def test_decay_alone_says_it_means_ema(tmp_path) -> None:
    help_text = cli("merge", "--help", cwd=tmp_path).stdout
    decay_help = " ".join(help_text.split("\n  --decay DECAY", 1)[1].split("\n  --", 1)[0].split())
    assert "without --schedule, implies --schedule ema" in decay_help, decay_help
    # ... and the command says so when it happens.
    paths = epochs(tmp_path, [1, 2])
    proc = cli("merge", *paths, "-o", "o.safetensors", "--decay", "0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--decay without --schedule: using --schedule ema" in proc.stderr, proc.stderr
    explicit = cli("merge", *paths, "-o", "p.safetensors", "--schedule", "ema", "--decay", "0.5",
                   cwd=tmp_path)  # fmt: skip
    assert "without --schedule" not in explicit.stderr, explicit.stderr


# --- 3. a model where a pytree is expected -------------------------------------------------


def test_torch_module_is_refused_with_what_to_pass() -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    with pytest.raises(polyak.PolyakError, match=r"torch.*Linear.*state_dict\(\)"):
        polyak.Averager("equal").update(model)
    with pytest.raises(polyak.PolyakError, match=r"state_dict\(\)"):
        polyak.average([model, model])
    # What the message says to pass works.
    averager = polyak.Averager("equal")
    averager.update(model.state_dict())
    torch.testing.assert_close(averager.value["weight"], model.weight.detach())


def test_keras_model_is_refused_with_what_to_pass() -> None:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(polyak.PolyakError, match=r"Keras.*get_weights\(\)"):
        polyak.Averager("equal").update(model)
    with pytest.raises(polyak.PolyakError, match=r"\[1\].*get_weights\(\)"):
        polyak.average([model.get_weights(), model])


# --- 6. the demo, 8. subcommand usage and speeds ------------------------------------------


def test_demo_says_it_deletes_its_folder_and_how_to_keep_it(tmp_path) -> None:
    proc = cli("demo", "-n", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "deleted" in proc.stdout and "--dir" in proc.stdout
    assert "GB" not in proc.stdout + proc.stderr  # one unit system: binary, as the sizes


def test_demo_with_dir_keeps_commands_that_rerun(tmp_path) -> None:
    proc = cli("demo", "-n", "3", "--dir", "kept", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "deleted" not in proc.stdout
    shown = next(ln for ln in proc.stdout.splitlines() if ln.startswith("$ polyak merge"))
    argv = shown[len("$ polyak ") :].split("    (in ")[0].split()
    rerun = cli(*argv, cwd=tmp_path / "kept")
    assert rerun.returncode == 0, rerun.stderr


def test_subcommand_errors_print_the_subcommand_usage(tmp_path) -> None:
    paths = epochs(tmp_path, [1, 2])
    proc = cli("merge", *paths, "-o", "x.safetensors", "--weights", "1,2,3", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: polyak merge"), proc.stderr
    proc = cli("weights", "--last", "2", "--decay", "0.9", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: polyak weights"), proc.stderr


def test_small_merges_print_no_meaningless_speed(tmp_path) -> None:
    paths = epochs(tmp_path, [1, 2])
    report = pst.merge(paths, tmp_path / "o.safetensors")
    text = str(report).replace(str(tmp_path), "DIR")
    assert "/s)" not in text and "GB" not in text, text  # was "(0.00 GB/s)"
    big = type(report)(**{**report.__dict__, "bytes_read": 3 * 2**30, "seconds": 2.0})
    assert "(1.5 GiB/s)" in str(big)


# --- 10. results into a framework ----------------------------------------------------------


def test_load_into_torch_keeps_bfloat16(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    import ml_dtypes
    from safetensors.torch import load_file as torch_load_file

    path = tmp_path / "bf16.safetensors"
    pst.save({"w": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)}, path)
    loaded = pst.load(path, framework="torch")
    assert loaded["w"].dtype == torch.bfloat16
    assert torch.equal(loaded["w"], torch_load_file(str(path))["w"])
    with pytest.raises(polyak.PolyakError, match="framework='tf2'"):
        pst.load(path, framework="tf2")


def test_load_into_jax(tmp_path) -> None:
    jnp = pytest.importorskip("jax.numpy")
    import ml_dtypes

    path = tmp_path / "bf16.safetensors"
    w = np.linspace(-2, 2, 6, dtype=np.float32).astype(ml_dtypes.bfloat16)
    save_file({"w": w}, str(path))  # the official writer
    loaded = pst.load(path, framework="jax")
    assert loaded["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(loaded["w"]), w)


def test_load_into_torch_reads_sharded_directories(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load_file

    paths = epochs(tmp_path, [1, 2])
    out = tmp_path / "sharded"
    pst.merge(paths, out, max_shard_size=30)  # one tensor per shard
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == 2
    loaded = pst.load(out, framework="torch")
    expected = {k: v for s in shards for k, v in torch_load_file(str(s)).items()}
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert torch.equal(loaded[name], expected[name]), name
    # A folder holding one .safetensors file and no index (save_pretrained's unsharded form)
    single = tmp_path / "single"
    single.mkdir()
    save_file({"w": np.arange(4, dtype=np.float32)}, str(single / "model.safetensors"))
    got = pst.load(single, framework="torch")
    assert torch.equal(got["w"], torch_load_file(str(single / "model.safetensors"))["w"])


# --- 1. every path-taking entry point uses the shared helper ------------------------------


def test_order_inputs_is_the_one_helper() -> None:
    from polyak.utils import order_inputs, order_problem

    names = ["run/epoch_10.keras", "run/epoch_9.keras"]
    with pytest.warns(polyak.OrderWarning, match="'epoch_10.keras' is given before") as rec:
        assert order_inputs(names) == names
    assert rec[0].filename == __file__
    assert order_inputs(names, sort="natural") == names[::-1]
    assert order_problem(names[::-1]) is None
    assert order_problem(["best.keras", "epoch_9.keras"]) is None  # not all numbered
    assert polyak.OrderWarning is pst.OrderWarning
    with pytest.raises(polyak.PolyakError, match="single path"):
        order_inputs("run/epoch_1.keras")


def test_merge_many_and_plan_take_sort(unsorted, tmp_path) -> None:
    natural = sorted(unsorted, key=lambda p: natural_key(os.path.basename(p)))
    plan = pst.plan_merge(unsorted, [tmp_path / "p.safetensors"], ["linear"])
    assert plan.warnings and "natural order" in plan.warnings[0]
    assert pst.plan_merge(unsorted, [tmp_path / "p.safetensors"], ["linear"],
                          sort="natural").warnings == ()  # fmt: skip
    with pytest.warns(polyak.OrderWarning):
        pst.merge_many(unsorted, [tmp_path / "a.safetensors"], ["linear"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", polyak.OrderWarning)
        pst.merge_many(unsorted, [tmp_path / "b.safetensors"], ["linear"], sort="natural")
    np.testing.assert_allclose(
        load_file(str(tmp_path / "b.safetensors"))["w"], reference(natural, [1, 2, 3]), rtol=1e-6
    )


def test_format_neutral_merge_warns_and_sorts(unsorted, tmp_path) -> None:
    natural = sorted(unsorted, key=lambda p: natural_key(os.path.basename(p)))
    with pytest.warns(polyak.OrderWarning, match="integer tensors"):
        polyak.merge(unsorted, tmp_path / "a.safetensors", "linear")
    with warnings.catch_warnings():
        warnings.simplefilter("error", polyak.OrderWarning)
        polyak.merge(unsorted, tmp_path / "b.safetensors", "linear", sort="natural")
    out = load_file(str(tmp_path / "b.safetensors"))
    np.testing.assert_allclose(out["w"], reference(natural, [1, 2, 3]), rtol=1e-6)
    assert out["steps"] == 200
