"""The merge settings are declared once (polyak.safetensors.MergeSettings and its two
extensions) and every merge and plan function takes them as ``**settings``: a misspelt or
misplaced keyword is a TypeError at run time and an error for a type checker, and every
declared key reaches the merge."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import polyak
import polyak.safetensors as pst
from polyak import _merge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ckpts(tmp_path):
    paths = []
    for i in (10, 9, 1):  # given out of natural order on purpose
        paths.append(str(tmp_path / f"epoch_{i}.safetensors"))
        pst.save({"w": np.full(6, float(i), np.float32), "n": np.array([i])}, paths[-1])
    return paths


def _calls(ckpts, out):
    many = ([out], [None])
    return {
        "polyak.safetensors.merge": lambda **kw: pst.merge(ckpts, out, **kw),
        "polyak.safetensors.merge_many": lambda **kw: pst.merge_many(ckpts, *many, **kw),
        "polyak.safetensors.plan_merge": lambda **kw: pst.plan_merge(ckpts, *many, **kw),
        "polyak.merge": lambda **kw: polyak.merge(ckpts, out, **kw),
        "polyak.plan": lambda **kw: _merge.plan(ckpts, out, **kw),
    }


@pytest.mark.parametrize(
    "name",
    [
        "polyak.safetensors.merge",
        "polyak.safetensors.merge_many",
        "polyak.safetensors.plan_merge",
        "polyak.merge",
        "polyak.plan",
    ],
)
def test_a_misspelt_setting_is_a_type_error_naming_the_function_and_the_settings(
    ckpts, tmp_path, name
):
    call = _calls(ckpts, str(tmp_path / "out.safetensors"))[name]
    short = name.rsplit(".", 1)[1]
    with pytest.raises(TypeError, match=rf"{short}\(\) got unexpected keyword.* dtyp;") as e:
        call(dtyp="bf16")
    assert "dtype" in str(e.value) and "threads" in str(e.value)
    assert not os.path.exists(tmp_path / "out.safetensors")


def test_settings_of_one_function_are_refused_by_the_others(ckpts, tmp_path):
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(TypeError, match=r"merge\(\) got unexpected keyword.* key;"):
        pst.merge(ckpts, out, key="state_dict")  # only polyak.merge reads nested files
    with pytest.raises(TypeError, match=r"merge\(\) got unexpected keyword.* schedules;"):
        polyak.merge(ckpts, out, schedules=[None])  # only the many-output functions
    assert not os.path.exists(out)


def test_every_declared_setting_reaches_the_merge(ckpts, tmp_path):
    out = str(tmp_path / "out")
    seen = []
    settings = {
        "normalize": False,
        "dtype": "float16",
        "int_policy": "first",
        "accumulate_dtype": "float64",
        "threads": 1,
        "max_shard_size": 10,  # bytes: one shard per tensor
        "chunk_elements": 2,
        "sort": "natural",
        "progress": lambda done, total: seen.append((done, total)),
        "force": True,
    }
    assert set(settings) == set(pst.MergeSettings.__annotations__)
    os.makedirs(out)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("not polyak's")  # writing here needs force
    report = pst.merge(ckpts, out, [1.0, 1.0, 1.0], **settings)
    loaded = pst.load(out)
    np.testing.assert_array_equal(loaded["w"], np.full(6, 20.0, np.float16))  # not normalized
    np.testing.assert_array_equal(loaded["n"], [1])  # "first" of epoch_1, 9, 10: sorted
    assert len(report.files) == 3 and report.threads == 1  # two shards and the index
    assert seen and seen[-1][0] == seen[-1][1] == report.bytes_read
    assert os.path.exists(os.path.join(out, "notes.txt"))
    # chunk_elements sizes the buffers (seen in the plan, which ignores progress and force)
    small = pst.plan_merge(ckpts, [out], [None], **{**settings, "chunk_elements": 2})
    large = pst.plan_merge(ckpts, [out], [None], **{**settings, "chunk_elements": 4096})
    assert small.buffer_bytes < large.buffer_bytes


def test_checkpoint_settings_reach_polyak_plan(ckpts, tmp_path):
    """polyak.plan (behind ``polyak merge --dry-run``) honours sort like polyak.merge."""
    plan, copied = _merge.plan(ckpts, str(tmp_path / "o.safetensors"), sort="natural")
    assert [os.path.basename(p) for p in plan.inputs] == [
        "epoch_1.safetensors",
        "epoch_9.safetensors",
        "epoch_10.safetensors",
    ]
    assert copied == []


def test_type_checkers_see_each_setting(tmp_path):
    """PEP 692: mypy names a misspelt, mistyped or misplaced setting in a user's code."""
    pytest.importorskip("mypy")
    user = tmp_path / "user_code.py"
    user.write_text(
        textwrap.dedent(
            """
            import polyak
            import polyak.safetensors as pst

            pst.merge(["a.safetensors"], "o.safetensors", dtype="bf16", threads=2)
            pst.merge_many(["a"], ["o.safetensors"], [None], schedules=[None], sort="natural")
            pst.merge(["a.safetensors"], "o.safetensors", dtyp="bf16")
            pst.merge(["a.safetensors"], "o.safetensors", threads="2")
            pst.plan_merge(["a"], ["o.safetensors"], [None], key="model")
            polyak.merge(["a.pt"], "o.safetensors", key="model", copy_files=False)
            polyak.merge(["a.pt"], "o.safetensors", schedules=[None])
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-incremental", str(user)],
        capture_output=True,
        text=True,
        env=dict(os.environ, MYPYPATH=ROOT),
        cwd=tmp_path,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ": error:" in ln]
    assert len(lines) == 4, proc.stdout + proc.stderr
    assert 'user_code.py:7: error: Unexpected keyword argument "dtyp"' in lines[0]
    assert 'user_code.py:8: error: Argument "threads"' in lines[1]
    assert 'user_code.py:9: error: Unexpected keyword argument "key"' in lines[2]
    assert 'user_code.py:11: error: Unexpected keyword argument "schedules"' in lines[3]


@pytest.mark.parametrize(
    "name",
    ["polyak.safetensors.merge", "polyak.safetensors.merge_many", "polyak.merge"],
)
def test_the_order_warning_points_at_the_callers_line(ckpts, tmp_path, name):
    call = _calls(ckpts, str(tmp_path / "out.safetensors"))[name]
    with pytest.warns(polyak.OrderWarning, match="epoch_9") as rec:
        call()
    assert [w.filename for w in rec] == [__file__]
