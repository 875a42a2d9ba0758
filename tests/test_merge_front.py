"""polyak.merge and the CLI on the checkpoints people have: transformers save_pretrained folders
(both serializations, sharded or not), Trainer checkpoint-N folders, Lightning-style torch
files, DCP folders. Outputs are loaded back by transformers / safetensors and checked against
a float64 average and against polyak.average of the loaded inputs."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_checkpoints_dcp_hf import _dcp_save, _tiny_gpt2, save_pretrained  # noqa: E402

import polyak  # noqa: E402
import polyak._merge as polyak_merge  # noqa: E402
import polyak.safetensors as pst  # noqa: E402
from polyak.checkpoints import ConfigWarning, KeyChoiceError  # noqa: E402
from polyak.checkpoints._dcp import torch_to_numpy  # noqa: E402


def polyak_cmd(*args):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(
        [sys.executable, "-m", "polyak", *args], capture_output=True, text=True, env=env
    )


def _np_state(model):
    return {k: torch_to_numpy(v.detach()) for k, v in model.state_dict().items()}


def _folders(tmp_path, *, safe, shard=None, dtype=torch.float32, n=3):
    folders, states = [], []
    for i in range(n):
        model = _tiny_gpt2(10 + i).to(dtype)
        folder = tmp_path / f"checkpoint-{100 * (i + 1)}"
        save_pretrained(model, folder, safe=safe, shard=shard)
        folders.append(str(folder))
        states.append(_np_state(model))
    return folders, states


def _check_loaded(out, states, dtype):
    """from_pretrained(out) works; its state is the float64 mean (to the dtype's rounding)
    and polyak.average of the inputs' loaded state bit for bit, tied embeddings included."""
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    got = _np_state(model)
    assert set(got) == set(states[0])
    want = polyak.average(states)
    eps32 = float(np.finfo(np.float32).eps)
    eps = eps32 if dtype == torch.float32 else 2.0**-8  # one rounding to the output dtype
    for name, arr in got.items():
        assert arr.tobytes() == want[name].tobytes(), name
        xs = np.stack([s[name].astype(np.float64) for s in states])
        ref = xs.mean(axis=0)
        # float32 accumulation of 3 terms, then one rounding to the output dtype.
        bound = eps * np.abs(ref) + 4 * eps32 * np.abs(xs).mean(axis=0) + 1e-30
        assert np.all(np.abs(arr.astype(np.float64) - ref) <= bound), name
    # Tied: the head is the averaged embedding itself.
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize(
    "safe,shard,dtype",
    [
        (True, None, torch.float32),
        (True, "20KB", torch.float32),
        (False, None, torch.float32),
        (False, "20KB", torch.float32),
        (True, None, torch.bfloat16),
    ],
)
def test_save_pretrained_folders_merge_into_a_loadable_model(tmp_path, safe, shard, dtype):
    folders, states = _folders(tmp_path, safe=safe, shard=shard, dtype=dtype)
    out = tmp_path / "averaged"
    report = polyak.merge(folders, out, max_shard_size=shard)
    assert report.copied == ("config.json", "generation_config.json")
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json"} <= names
    if shard:
        assert len([n for n in names if n.endswith(".safetensors")]) > 1
    # The newest input's config, byte for byte.
    assert (out / "config.json").read_bytes() == open(f"{folders[-1]}/config.json", "rb").read()
    _check_loaded(out, states, dtype)


def test_trainer_checkpoints_copy_model_files_not_training_state(tmp_path):
    folders, states = _folders(tmp_path, safe=True)
    for i, f in enumerate(folders):
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            torch.save({"state": torch.ones(3)}, os.path.join(f, name))
        with open(os.path.join(f, "trainer_state.json"), "w") as fh:
            json.dump({"global_step": 100 * (i + 1)}, fh)
        torch.save({"lr": 0.1}, os.path.join(f, "training_args.bin"))
        with open(os.path.join(f, "tokenizer_config.json"), "w") as fh:
            json.dump({"model_max_length": 32 + i}, fh)
        os.makedirs(os.path.join(f, "additional_chat_templates"))
        with open(os.path.join(f, "additional_chat_templates", "tool.jinja"), "w") as fh:
            fh.write(f"template {i}")
    out = tmp_path / "averaged"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # same model: no warning
        report = polyak.merge(folders, out)
    assert report.copied == (
        "additional_chat_templates/tool.jinja",
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
    )
    got = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)
    assert got == sorted([*report.copied, "model.safetensors", "model.safetensors.index.json"])
    assert (out / "additional_chat_templates" / "tool.jinja").read_text() == "template 2"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 34
    _check_loaded(out, states, torch.float32)
    # Merging again into the same folder replaces the previous output, copies included
    # (they are recorded in its index), without force and without leftovers.
    polyak.merge(folders[:2], out)
    again = sorted(
        os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs
    )
    assert again == got
    assert (out / "additional_chat_templates" / "tool.jinja").read_text() == "template 1"
    _check_loaded(out, states[:2], torch.float32)
    # --no-copy-files / copy_files=False: weights only; a file output never gets copies.
    bare = polyak.merge(folders, tmp_path / "bare", copy_files=False)
    assert bare.copied == () and "config.json" not in os.listdir(tmp_path / "bare")
    single = polyak.merge(folders, tmp_path / "avg.safetensors")
    assert single.copied == ()


@pytest.mark.parametrize(
    "name,shard,copy_files",
    [
        ("avg.safetensors", None, True),  # a file output never gets copies
        ("sharded", "20KB", False),  # shards and index only
        ("model", None, True),  # a model folder: config files copied, named in the index
        ("model_sharded", "20KB", True),
    ],
)
def test_plan_bytes_to_write_equal_the_merge_bytes_written(tmp_path, name, shard, copy_files):
    # The dry run's size is what the disk needs; the copied config and tokenizer files and
    # their names in the index take space too.
    folders, _ = _folders(tmp_path, safe=True)
    with open(os.path.join(folders[-1], "tokenizer_config.json"), "w") as fh:
        json.dump({"model_max_length": 32, "padding": "x" * 3000}, fh)
    out = tmp_path / name
    # polyak._merge.plan is what `polyak merge --dry-run` prints.
    plan, copied = polyak_merge.plan(folders, out, max_shard_size=shard, copy_files=copy_files)
    assert not os.path.exists(out)
    report = polyak.merge(folders, out, max_shard_size=shard, copy_files=copy_files)
    assert report.copied == tuple(copied)
    assert bool(report.copied) == (copy_files and name.startswith("model"))
    if shard:
        assert len([f for f in report.files if f.endswith(".safetensors")]) > 1
    assert plan.bytes_to_write == (report.bytes_written,)


def test_config_difference_warns_and_cli_prints_it(tmp_path):
    folders, _ = _folders(tmp_path, safe=True)
    cfg_path = os.path.join(folders[1], "config.json")
    cfg = json.load(open(cfg_path))
    cfg["resid_pdrop"] = 0.5
    cfg["transformers_version"] = "0.0.1"  # bookkeeping: never reported
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.warns(ConfigWarning, match="resid_pdrop") as rec:
        polyak.merge(folders, tmp_path / "out")
    assert "transformers_version" not in str(rec[0].message)
    assert rec[0].filename == __file__  # points at the caller's line, not inside polyak
    proc = polyak_cmd("merge", *folders, "-o", str(tmp_path / "cli"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "polyak: warning: the inputs' config.json files differ: resid_pdrop" in proc.stderr
    assert "copied config.json, generation_config.json" in proc.stdout


def test_failed_merge_leaves_no_partial_folder(tmp_path, monkeypatch):
    folders, _ = _folders(tmp_path, safe=True)
    import polyak._stream

    def fail(*args, **kwargs):
        raise OSError(5, "simulated read failure in the middle of the merge")

    monkeypatch.setattr(polyak._stream, "run", fail)
    out = tmp_path / "averaged"
    with pytest.raises(OSError, match="simulated"):
        polyak.merge(folders, out)
    assert not out.exists()  # neither weights nor config.json


def _lightning_files(tmp_path, n=3):
    g = torch.Generator().manual_seed(3)
    paths, sds = [], []
    for i in range(n):
        sd = {
            "net.weight": torch.randn(20, 7, generator=g),
            "net.bias": torch.randn(7, generator=g).bfloat16(),
            "bn.num_batches_tracked": torch.tensor(10 * i),
        }
        p = tmp_path / f"epoch={i}-step={100 * i}.ckpt"
        torch.save(
            {
                "state_dict": sd,
                "epoch": i,
                "optimizer_states": [{"lr": 0.1}],
                "ema": {"w": sd["net.weight"]},
            },
            p,
        )
        paths.append(str(p))
        sds.append({k: torch_to_numpy(v) for k, v in sd.items()})
    return paths, sds


def test_cli_merges_lightning_files_with_key(tmp_path):
    paths, sds = _lightning_files(tmp_path)
    out = tmp_path / "avg.safetensors"
    # No --key: an error listing the keys holding tensor mappings, and nothing written.
    proc = polyak_cmd("merge", *paths, "-o", str(out), "--no-progress")
    assert proc.returncode == 1
    assert "keys holding tensor mappings: state_dict, ema; pass --key state_dict" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)
    with pytest.raises(KeyChoiceError):
        polyak.merge(paths, out)
    proc = polyak_cmd("merge", *paths, "-o", str(out), "--key", "state_dict", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    got = pst.load(str(out))
    want = polyak.average(sds)
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k
    ref = np.mean([s["net.weight"].astype(np.float64) for s in sds], axis=0)
    np.testing.assert_allclose(got["net.weight"], ref, rtol=1e-6)
    assert int(got["bn.num_batches_tracked"]) == 20  # int_policy "last"


@pytest.mark.parametrize("name", ["avg.pt", "avg.bin", "avg.ckpt", "avg.pth.tar"])
def test_torch_named_output_is_refused(tmp_path, name):
    paths, _ = _lightning_files(tmp_path, n=2)
    out = tmp_path / name
    proc = polyak_cmd("merge", *paths, "-o", str(out), "--key", "state_dict", "--no-progress")
    assert proc.returncode == 1
    assert "polyak writes safetensors only" in proc.stderr and ".safetensors" in proc.stderr
    assert not out.exists()
    with pytest.raises(pst.OutputError, match="names a torch file"):
        polyak.merge(paths, out, key="state_dict")


def test_cli_merges_dcp_folders(tmp_path):
    g = torch.Generator().manual_seed(5)
    folders, sds = [], []
    for i in range(3):
        sd = {"layer.weight": torch.randn(30, 5, generator=g), "step": torch.tensor(i)}
        folders.append(str(tmp_path / f"dcp-{i}"))
        _dcp_save({"model": sd, "epoch": i}, folders[-1])
        sds.append({k: torch_to_numpy(v) for k, v in sd.items()})
    out = tmp_path / "avg.safetensors"
    proc = polyak_cmd("merge", *folders, "-o", str(out), "--key", "model", "--schedule", "linear",
                      "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = pst.load(str(out))
    want = polyak.average(sds, "linear")
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k


def test_inspect_every_kind(tmp_path):
    paths, _ = _lightning_files(tmp_path, n=1)
    proc = polyak_cmd("inspect", paths[0])
    assert proc.returncode == 0, proc.stderr
    assert "torch checkpoint" in proc.stdout and "nested" in proc.stdout
    assert "--key state_dict" in proc.stdout and "--key ema" in proc.stdout
    assert "3 tensors" in proc.stdout  # under state_dict
    proc = polyak_cmd("inspect", paths[0], "--key", "state_dict")
    assert "net.weight" in proc.stdout and "[20, 7]" in proc.stdout and "bfloat16" in proc.stdout
    assert "other keys holding tensor mappings: ema" in proc.stdout
    js = json.loads(polyak_cmd("inspect", paths[0], "--json").stdout)
    assert [c["key"] for c in js["candidates"]] == ["state_dict", "ema"]

    folders, _ = _folders(tmp_path, safe=False, n=1)
    proc = polyak_cmd("inspect", folders[0])
    assert "Hugging Face model folder" in proc.stdout
    assert "weights: torch, pytorch_model.bin" in proc.stdout
    assert "model files (copied by merge): config.json, generation_config.json" in proc.stdout
    assert "transformer.wte.weight" in proc.stdout and "[64, 16]" in proc.stdout

    dcp = str(tmp_path / "dcp")
    _dcp_save({"model": {"w": torch.ones(5)}, "step": 3}, dcp)
    proc = polyak_cmd("inspect", dcp)
    assert "torch.distributed.checkpoint folder" in proc.stdout and "--key model" in proc.stdout
    js = json.loads(polyak_cmd("inspect", dcp, "--key", "model", "--json").stdout)
    assert js["kind"] == "dcp" and js["tensors"] == [
        {"name": "w", "dtype": "float32", "shape": [5], "nbytes": 20}
    ]

    st = str(tmp_path / "x.safetensors")
    pst.save({"w": np.ones(3, np.float32)}, st)
    assert "safetensors file" in polyak_cmd("inspect", st).stdout


def test_import_polyak_loads_merge_lazily():
    code = (
        "import sys, polyak; assert 'polyak.checkpoints' not in sys.modules; "
        "assert not any(m.split('.')[0] in ('torch', 'jax', 'keras') for m in sys.modules); "
        "f = polyak.merge; assert f.__module__ == 'polyak._merge'; "
        "assert 'torch' not in sys.modules; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))  # fmt: skip
    assert proc.stdout.strip() == "ok", proc.stderr


def test_docstring_examples_run():
    import doctest

    import polyak._merge

    assert doctest.testmod(polyak._merge, raise_on_error=False).failed == 0


def test_torch_input_changed_during_the_merge_writes_nothing(tmp_path):
    paths, _ = _lightning_files(tmp_path, n=2)
    out = tmp_path / "avg.safetensors"

    def touch_first(done, total):
        # Another process rewrites an input while it is being read.
        st = os.stat(paths[0])
        os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    with pytest.raises(pst.CheckpointError, match="was modified"):
        polyak.merge(paths, out, key="state_dict", progress=touch_first, threads=1)
    assert not out.exists()
