"""The ``polyak`` command line, end to end in subprocesses (``python -m polyak``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import polyak
import polyak.safetensors as pst
from polyak import cli
from polyak.utils import format_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def polyak_cmd(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "polyak", *args],
        env=env, capture_output=True, text=True, timeout=120, cwd=cwd,
    )  # fmt: skip


@pytest.fixture
def run(tmp_path):
    rng = np.random.default_rng(0)
    paths, trees = [], []
    for i in range(1, 5):
        tree = {
            "w": rng.standard_normal((20, 30)).astype(np.float32),
            "h": rng.standard_normal(40).astype(ml_dtypes.bfloat16),
            "step": np.int64(i * 10),
        }
        p = str(tmp_path / f"epoch_{i}.safetensors")
        pst.save(tree, p, {"format": "np"})
        paths.append(p)
        trees.append(pst.load(p))
    return paths, trees


def _same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert got[k].tobytes() == np.asarray(expected[k]).tobytes(), k


@pytest.mark.parametrize(
    "flags, schedule",
    [
        ([], None),
        (["--schedule", "linear"], "linear"),
        (["--schedule", "exponential", "--alpha", "1.5"], polyak.schedules.exponential(1.5)),
        (["--decay", "0.5"], polyak.schedules.ema(0.5)),
        (["--last", "2"], polyak.schedules.tail(2)),
        (["--weights", "1,0,2,1"], [1, 0, 2, 1]),
    ],
)
def test_merge_matches_average(run, tmp_path, flags, schedule):
    paths, trees = run
    out = str(tmp_path / "avg.safetensors")
    proc = polyak_cmd("merge", *paths, "-o", out, *flags)
    assert proc.returncode == 0, proc.stderr
    assert "merged 3 tensors" in proc.stdout
    _same(pst.load(out), polyak.average(trees, schedule))
    # Not a terminal: no progress bar; only the schedule a lone parameter implies is said.
    flag = flags[0] if flags else ""
    implied = {"--decay": "ema", "--last": "tail"}.get(flag)
    said = f"polyak: {flag} without --schedule: using --schedule {implied}\n" if implied else ""
    assert proc.stderr == said


def test_merge_dtype_and_sharded_output(run, tmp_path):
    paths, trees = run
    out = tmp_path / "bf16"
    proc = polyak_cmd(
        "merge", *paths, "-o", str(out), "--dtype", "bf16", "--max-shard-size", "1KB"
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors.index.json").exists()
    got = pst.load(str(out))
    assert got["w"].dtype == ml_dtypes.bfloat16
    expected = polyak.average(trees)["w"].astype(ml_dtypes.bfloat16)
    assert got["w"].tobytes() == expected.tobytes()


def test_merge_progress_bar_when_forced(run, tmp_path):
    paths, _ = run
    proc = polyak_cmd("merge", *paths, "-o", str(tmp_path / "m.safetensors"), "--progress")
    assert proc.returncode == 0, proc.stderr
    assert "merge" in proc.stderr and "100%" in proc.stderr
    # Not a terminal (captured here): no bar, and nothing else on stderr either.
    proc = polyak_cmd("merge", *paths, "-o", str(tmp_path / "m2.safetensors"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_merge_progress_bar_by_default_on_a_terminal(run, tmp_path):
    pty = pytest.importorskip("pty")
    fcntl = pytest.importorskip("fcntl")
    termios = pytest.importorskip("termios")
    import struct

    paths, _ = run
    try:
        leader, follower = pty.openpty()
    except OSError as e:  # a sandbox without pseudo-terminals
        pytest.skip(f"no pseudo-terminal: {e}")
    # A fresh pseudo-terminal is 0 columns wide, in which tqdm draws nothing.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "polyak", "merge", *paths, "-o", str(tmp_path / "m.st")],
            stderr=follower, stdout=subprocess.PIPE, env=env, timeout=120,
        )  # fmt: skip
        os.close(follower)
        follower = -1
        err = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            err += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 0
    assert b"100%" in err, err


def test_dry_run_plans_without_writing(run, tmp_path):
    paths, trees = run
    out = str(tmp_path / "never.safetensors")
    proc = polyak_cmd("merge", *paths, "-o", out, "--schedule", "linear", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(out)
    text = proc.stdout
    assert "all 4 valid and matching" in text
    assert "tensors: 3 (1 bfloat16, 1 float32, 1 int64)" in text
    assert "peak memory: about" in text and "nothing was written" in text
    for name, w in zip(["epoch_1", "epoch_4"], [0.1, 0.4], strict=True):
        line = next(ln for ln in text.splitlines() if name in ln)
        assert f"{w:.6f}" in line
    total = sum(v.nbytes for t in trees for v in t.values())
    assert f"to read: {format_bytes(total)}" in text
    proc = polyak_cmd("merge", *paths, "-o", out, "--schedule", "linear", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"to write: {format_bytes(os.path.getsize(out))}" in text


def test_dry_run_reports_mismatches(run, tmp_path):
    paths, _ = run
    odd = str(tmp_path / "epoch_5.safetensors")
    pst.save({"w": np.zeros((20, 31), np.float32), "h": np.zeros(40, np.float32)}, odd)
    proc = polyak_cmd("merge", *paths, odd, "-o", str(tmp_path / "m.safetensors"), "--dry-run")
    assert proc.returncode == 1
    assert "missing 1 tensor(s): 'step'" in proc.stderr
    assert "'w' (20, 31) != (20, 30)" in proc.stderr
    assert "'h' float32 != bfloat16" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_natural_order_warning_keeps_given_order(tmp_path):
    paths = []
    for i in (9, 10):
        p = str(tmp_path / f"epoch_{i}.safetensors")
        pst.save({"w": np.full(2, float(i), np.float32)}, p)
        paths.append(p)
    out = str(tmp_path / "m.safetensors")
    proc = polyak_cmd("merge", paths[1], paths[0], "-o", out, "--weights", "1,0")
    assert proc.returncode == 0, proc.stderr
    assert "warning: inputs are not in natural order" in proc.stderr
    assert "'epoch_10.safetensors' is given before 'epoch_9.safetensors'" in proc.stderr
    assert proc.stderr.count("natural order") == 1
    assert np.array_equal(pst.load(out)["w"], [10.0, 10.0])  # the order given, not sorted


def test_merge_errors_are_one_line(run, tmp_path):
    paths, _ = run
    cases = [
        (["merge", *paths, "-o", paths[0]], "one of the inputs"),
        (
            [
                "merge",
                str(tmp_path / "missing.safetensors"),
                "-o",
                str(tmp_path / "m.safetensors"),
            ],
            "no such file",
        ),  # fmt: skip
        (
            ["merge", *paths, "-o", str(tmp_path / "m.safetensors"), "--schedule", "nope"],
            "unknown schedule",
        ),  # fmt: skip
        (
            ["merge", *paths, "-o", str(tmp_path / "m.safetensors"), "--int-policy", "error"],
            "int_policy='error'",
        ),  # fmt: skip
    ]
    for argv, message in cases:
        proc = polyak_cmd(*argv)
        assert proc.returncode == 1, (argv, proc.stderr)
        assert proc.stderr.startswith("polyak: error:") and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    usage = polyak_cmd(
        "merge", *paths, "-o", "x.safetensors", "--weights", "1,1,1,1", "--decay", "0.5"
    )
    assert usage.returncode == 2 and "either --weights or a schedule" in usage.stderr
    count = polyak_cmd("merge", *paths, "-o", str(tmp_path / "m.safetensors"), "--weights", "1,2")
    assert count.returncode == 2 and "--weights gives 2 weights for 4 checkpoints" in count.stderr
    assert "Traceback" not in count.stderr and not os.path.exists(tmp_path / "m.safetensors")
    assert polyak_cmd("merge", *paths).returncode == 2  # -o is required


def test_schedule_parameter_errors_name_the_flags(run, tmp_path):
    paths, _ = run
    out = str(tmp_path / "m.safetensors")
    for flags, message in [
        (["--schedule", "ema"], "schedule 'ema' needs --decay"),
        (["--schedule", "swa"], "schedule 'swa' needs --start"),
        (
            ["--schedule", "linear", "--decay", "0.9"],
            "--decay does not apply to schedule 'linear'",
        ),
        (["--schedule", "exponential", "--last", "2"], "(it takes --alpha)"),
        (["--schedule", "explicit"], "pass --weights"),
    ]:
        proc = polyak_cmd("merge", *paths, "-o", out, *flags)
        assert proc.returncode == 2, (flags, proc.stderr)
        assert message in proc.stderr.splitlines()[-1], proc.stderr
        assert "Traceback" not in proc.stderr and "keyword argument" not in proc.stderr
    assert not os.path.exists(out)


def test_output_paths_through_a_file_are_one_line_errors(run, tmp_path):
    paths, _ = run
    blocker = tmp_path / "blocker.safetensors"
    blocker.write_bytes(b"not a folder")
    for out, message in [
        (f"{blocker}/", "exists and is not a directory"),
        (f"{blocker}/sub", "cannot create output directory"),
        (f"{blocker}/m.safetensors", "is not a directory"),
    ]:
        proc = polyak_cmd("merge", *paths, "-o", out)
        assert proc.returncode == 1, (out, proc.stderr)
        assert proc.stderr.startswith("polyak: error:") and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert blocker.read_bytes() == b"not a folder"


def test_closed_stdout_pipe_is_not_a_traceback(tmp_path):
    path = str(tmp_path / "many.safetensors")
    pst.save({f"layer.{i}.weight": np.zeros(2, np.float32) for i in range(3000)}, path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyak", "inspect", path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    proc.stdout.read(100)  # like `| head -c 100`: read a little, then go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_help_documents_every_option_and_its_examples_parse():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)
    merge_help = subs.choices["merge"].format_help()
    examples = [ln.strip() for ln in merge_help.split("examples:")[1].splitlines() if ln.strip()]
    assert examples
    for line in examples:
        argv = line.split()[1:]  # without "polyak"
        args = parser.parse_args(argv)
        cli.schedule_from_args(args)  # the schedule flags fit together


def test_inspect(run, tmp_path):
    paths, _ = run
    proc = polyak_cmd("inspect", paths[0])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "safetensors file" in lines[0]
    w_line = next(ln for ln in lines if ln.strip().startswith("w "))
    assert "F32" in w_line and "[20, 30]" in w_line and "2.3 KiB" in w_line
    assert "3 tensors, 641 elements" in proc.stdout
    assert "format: np" in proc.stdout
    js = json.loads(polyak_cmd("inspect", paths[0], "--json").stdout)
    assert {t["name"]: t["shape"] for t in js["tensors"]} == {"w": [20, 30], "h": [40], "step": []}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    proc = polyak_cmd("inspect", str(bad))
    assert proc.returncode == 1 and "too small" in proc.stderr


def test_inspect_sharded_directory(run, tmp_path):
    paths, trees = run
    out = str(tmp_path / "sharded")
    proc = polyak_cmd("merge", *paths, "-o", out, "--max-shard-size", "2KB", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) == 3  # step + w (2400 B) exceed 2 KB, so each float tensor gets its own
    proc = polyak_cmd("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"{out}: sharded checkpoint, 3 shards"
    for shard in shards:
        line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(shard))
        with pst.Checkpoint(os.path.join(out, shard)) as ck:
            assert f"{len(ck)} tensors" in line and format_bytes(ck.nbytes) in line
    assert "3 tensors, 641 elements" in proc.stdout
    assert '"inputs": ["epoch_1.safetensors"' in proc.stdout  # the merge record is shown
    js = json.loads(polyak_cmd("inspect", out, "--json").stdout)
    assert js["shards"] == shards
    assert {t["name"] for t in js["tensors"]} == set(trees[0])


def test_weights_table():
    proc = polyak_cmd("weights", "linear", "-n", "4")
    assert proc.returncode == 0, proc.stderr
    rows = [ln.split() for ln in proc.stdout.splitlines()[1:5]]
    assert [float(r[1]) for r in rows] == [0.1, 0.2, 0.3, 0.4]
    assert [len(r[2]) for r in rows] == [10, 20, 30, 40]  # the bar chart, scaled to the largest
    assert "sum" in proc.stdout
    proc = polyak_cmd("weights", "ema", "--decay", "0.5", "-n", "3")
    assert [float(ln.split()[1]) for ln in proc.stdout.splitlines()[1:4]] == [0.25, 0.25, 0.5]
    proc = polyak_cmd("weights", "2,-1", "-n", "2", "--no-normalize")
    assert "--------------------" in proc.stdout  # negative weights draw a '-' bar
    assert polyak_cmd("weights", "tail", "-n", "3").returncode == 1  # tail needs k or fraction


def test_demo_generates_merges_and_shows_them(tmp_path):
    folder = tmp_path / "demo"
    proc = polyak_cmd("demo", "--dir", str(folder), "-n", "3")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "generated 3 checkpoints" in out
    assert "linear() weights" in out and "exponential(alpha=2.0) weights" in out
    assert out.count("$ polyak merge step_1000.safetensors") == 3
    assert out.count("merged 4 tensors into") == 3  # each merge's report is shown
    names = sorted(os.listdir(folder))
    assert "merged_linear.safetensors" in names and "step_3000.safetensors" in names
    merged = pst.load(str(folder / "merged_linear.safetensors"))
    assert merged["head.weight"].dtype == ml_dtypes.bfloat16 and merged["step"] == 3000
    # The check the demo used to print: every merge it ran equals polyak.average bit for bit.
    trees = [pst.load(str(folder / f"step_{1000 * i}.safetensors")) for i in (1, 2, 3)]
    for label, _, params in cli.demo.SCHEDULES:
        expected = polyak.average(trees, polyak.schedules.get(label, **params))
        got = pst.load(str(folder / f"merged_{label}.safetensors"))
        _same(got, expected)
        assert f"{float(got['encoder.bias'][0]):+.6f}" in out  # the value the tour follows
    # A second run reuses the checkpoints it finds.
    again = polyak_cmd("demo", "--dir", str(folder))
    assert again.returncode == 0 and "using 3 checkpoints" in again.stdout


def test_demo_stops_at_a_failing_merge(tmp_path, monkeypatch, capsys):
    # A merge the demo runs fails (here: the disk refuses); the demo reports it and stops.
    from polyak.safetensors import OutputWriteError

    def refuse(*args, **kwargs):
        raise OutputWriteError(28, "cannot write merged_equal.safetensors: no space left")

    import polyak.safetensors._merge as merge_module  # what polyak.merge runs the job with

    monkeypatch.setattr(merge_module, "run_merge", refuse)
    assert cli.main(["demo", "--dir", str(tmp_path), "-n", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("polyak: error: cannot write merged_equal"), captured.err
    assert "done:" not in captured.out and not (tmp_path / "merged_linear.safetensors").exists()


def test_demo_without_dir_cleans_up():
    proc = polyak_cmd("demo", "-n", "2")
    assert proc.returncode == 0, proc.stderr
    folder = proc.stdout.split("checkpoints in ")[1].split(" (")[0]
    assert not os.path.exists(folder)


def test_commands_registered_in_one_place():
    names = [c[0] for c in cli.COMMANDS]
    assert names == ["merge", "inspect", "weights", "demo", "posthoc"]
    help_text = polyak_cmd("--help").stdout
    assert all(n in help_text for n in names)
