"""Outputs are transactions: under SIGKILL, full disks, races and foreign folders (issue 13).

Every test here reproduces a failure of the former writer: a sharded output left mixed or
half-written, two writers interleaving, files of another model deleted, long names refused,
temporary files left behind or deleted under a live writer.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import polyak.safetensors as pst
from polyak.safetensors import _writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _sharded_inputs(folder: str, n: int = 2, elements: int = 1_000_000) -> list[str]:
    """``n`` sharded checkpoints written by polyak: three 4 MB tensors, one per shard."""
    rng = np.random.default_rng(13)
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"ckpt_{i}")
        tree = {f"layer{k}.w": rng.standard_normal(elements).astype(np.float32) for k in range(3)}
        pst.save(tree, p, max_shard_size=elements * 4)
        paths.append(p)
    return paths


def _official_load(folder: str) -> dict[str, np.ndarray]:
    """The folder's checkpoint as the official reader sees it, through its index."""
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = load_file(os.path.join(folder, shard))
        assert {k for k, v in weight_map.items() if v == shard} == set(tensors)
        out.update(tensors)
    return out


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _merge_cmd(inputs: list[str], out: str, schedule: list[str]) -> list[str]:
    return [sys.executable, "-m", "polyak", "merge", *inputs, "-o", out, *schedule]


SCHEDULES = {"last": ["-s", "tail", "--last", "1"], "equal": ["-s", "equal"]}


def _hidden_temps(parent: str) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(".polyak-")]


def _leftovers(folder, expected) -> list[str]:
    """Names in ``folder`` beyond ``expected`` (temporaries, locks, staging folders)."""
    return sorted(set(os.listdir(folder)) - {os.path.basename(str(e)) for e in expected})


def _identities(folder: str) -> set[tuple[str, int]]:
    try:
        return {(e.name, e.inode()) for e in os.scandir(folder)} | {("", os.stat(folder).st_ino)}
    except OSError:
        return set()


def _kill_when(proc: subprocess.Popen, out: str, strategy: str, rng: random.Random, span: float):
    """SIGKILL the merge at a point chosen by ``strategy``; whether it was still running.

    "random": after a random delay within a whole run. "change": as soon as anything under the
    output name changes (the first shard renamed, or the folder swapped), plus a few polls.
    "temp": as soon as anything new appears beside or inside the output (a temporary, a lock).
    """
    parent = os.path.dirname(out)

    def names() -> set[str]:
        try:
            return set(os.listdir(parent)) | set(os.listdir(out))
        except OSError:
            return set()

    if strategy == "random":
        try:
            proc.wait(timeout=rng.uniform(0.0, span))
        except subprocess.TimeoutExpired:
            pass
    else:
        before, ids = names(), _identities(out)
        while proc.poll() is None:
            if strategy == "change" and _identities(out) != ids:
                break
            if strategy == "temp" and names() != before:
                break
        for _ in range(rng.randrange(0, 20)):  # a little later, at a varying point
            if proc.poll() is not None:
                break
            os.listdir(parent)
    alive = proc.poll() is None
    if alive:
        proc.kill()
    proc.wait()
    return alive


def test_sigkill_at_random_points_leaves_the_previous_or_the_new_folder(tmp_path):
    """The headline guarantee: kill `polyak merge` into a sharded folder that already holds a
    previous polyak output, 24 times at random points; the folder is always one complete
    checkpoint, the previous one or the new one, never a mix, and files beside it survive."""
    inputs = _sharded_inputs(str(tmp_path))
    refs = {}
    for name, sched in SCHEDULES.items():
        ref = str(tmp_path / f"ref_{name}")
        start = time.perf_counter()
        subprocess.run(_merge_cmd(inputs, ref, sched), env=_env(), check=True)
        span = time.perf_counter() - start  # random kills fall within a whole run
        refs[name] = _official_load(ref)
    assert not _same(refs["last"], refs["equal"])
    out = tmp_path / "out"
    subprocess.run(_merge_cmd(inputs, str(out), SCHEDULES["last"]), env=_env(), check=True)
    (out / "config.json").write_text('{"model_type": "mine"}')  # not polyak's: must survive
    current = "last"
    rng = random.Random(1313)
    outcomes: dict[str, int] = {}
    for attempt in range(24):
        target = "equal" if current == "last" else "last"
        strategy = ("temp", "change", "random")[attempt % 3]
        proc = subprocess.Popen(
            _merge_cmd(inputs, str(out), SCHEDULES[target]),
            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        killed = _kill_when(proc, str(out), strategy, rng, span)
        got = _official_load(str(out))
        if _same(got, refs[target]):
            current = target
        else:
            assert _same(got, refs[current]), f"attempt {attempt}: a mixed checkpoint"
        key = f"{strategy}:{'killed' if killed else 'done'}:{current == target}"
        outcomes[key] = outcomes.get(key, 0) + 1
        assert (out / "config.json").read_text() == '{"model_type": "mine"}'
        assert sorted(os.listdir(out)) == sorted(
            ["config.json", "model.safetensors.index.json"]
            + [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
        )
    # Kills landed both before the swap (previous kept) and in the run (some completed).
    assert any(k.endswith(":False") and ":killed:" in k for k in outcomes), outcomes
    # The next merge removes every leftover of the killed ones.
    subprocess.run(_merge_cmd(inputs, str(out), SCHEDULES["equal"]), env=_env(), check=True)
    assert _same(_official_load(str(out)), refs["equal"])
    assert _leftovers(tmp_path, [*inputs, out, *[tmp_path / f"ref_{n}" for n in refs]]) == []


def test_disk_full_at_the_index_step_leaves_the_previous_folder(tmp_path, monkeypatch):
    inputs = _sharded_inputs(str(tmp_path), elements=1000)
    out = str(tmp_path / "out")
    pst.merge(inputs, out, "linear")
    before = _official_load(out)
    real = _writer.AtomicFile.__init__

    def init(self, path, size):
        if path.endswith(".index.json"):
            raise _writer._write_error(path, OSError(errno.ENOSPC, "No space left on device"))
        real(self, path, size)

    monkeypatch.setattr(_writer.AtomicFile, "__init__", init)
    with pytest.raises(pst.OutputWriteError, match="disk is full"):
        pst.merge(inputs, out)  # the equal average
    assert _same(_official_load(out), before)
    assert _leftovers(tmp_path, [*inputs, out]) == []
    fresh = str(tmp_path / "fresh")
    with pytest.raises(pst.OutputWriteError, match="disk is full"):
        pst.merge(inputs, fresh)
    assert _leftovers(tmp_path, [*inputs, out]) == []  # no folder, no shard, no index


@pytest.mark.parametrize("fraction", [0.0, 0.005, 0.5, 0.99])
def test_disk_full_at_any_byte_leaves_the_previous_folder(tmp_path, monkeypatch, fraction):
    """ENOSPC after a fraction of the output's bytes: in a header, in the data, in the index."""
    inputs = _sharded_inputs(str(tmp_path), elements=2000)
    out = str(tmp_path / "out")
    report = pst.merge(inputs, out, "linear")
    before = _official_load(out)
    real_pwrite, left = os.pwrite, [int(fraction * report.bytes_written)]

    def pwrite(fd, data, offset):
        n = memoryview(data).nbytes
        if n > left[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        left[0] -= n
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(_writer.os, "pwrite", pwrite)
    with pytest.raises(pst.OutputWriteError, match="disk is full"):
        pst.merge(inputs, out)
    assert _same(_official_load(out), before)
    assert _leftovers(tmp_path, [*inputs, out]) == []


def test_second_writer_of_an_output_gets_a_clear_error(tmp_path):
    """Two merges into one output: the second fails at once, the first completes alone."""
    inputs = _sharded_inputs(str(tmp_path), elements=1000)
    for out in (str(tmp_path / "folder"), str(tmp_path / "one.safetensors")):
        first = _writer.CheckpointWriter(
            _writer.OutputLayout(out, [("w", np.dtype(np.float32), (4,))])
        )
        try:
            with pytest.raises(pst.OutputError, match="being written by another merge"):
                pst.merge(inputs, out)
            proc = subprocess.run(
                _merge_cmd(inputs, out, []), env=_env(), capture_output=True, text=True
            )
            assert proc.returncode == 1
            assert "being written by another merge" in proc.stderr
            first.write("w", 0, np.arange(4, dtype=np.float32))
            first.commit()
        except BaseException:
            first.abort()
            raise
        np.testing.assert_array_equal(pst.load(out)["w"], np.arange(4, dtype=np.float32))
        pst.merge(inputs, out)  # the lock was released with the commit
    assert _leftovers(tmp_path, [*inputs, "folder", "one.safetensors"]) == []


def test_folder_of_another_model_is_refused_and_never_loses_files(tmp_path):
    """A folder holding another model's index and shards: refused without force; with force,
    the files with the output's names are replaced and every other file is kept."""
    inputs = _sharded_inputs(str(tmp_path), elements=1000)
    other = tmp_path / "other"
    other.mkdir()
    theirs = {"a": np.ones(3, np.float32)}
    from safetensors.numpy import save_file

    save_file(theirs, str(other / "their-00001-of-00001.safetensors"))
    (other / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "their-00001-of-00001.safetensors"}})
    )
    (other / "notes.txt").write_text("keep me")
    listing = sorted(os.listdir(other))
    with pytest.raises(pst.OutputError, match="force=True"):
        pst.merge(inputs, str(other))
    assert sorted(os.listdir(other)) == listing
    notes = tmp_path / "notes_only"
    notes.mkdir()
    (notes / "README").write_text("mine")
    with pytest.raises(pst.OutputError, match="not empty"):
        pst.merge(inputs, str(notes))
    # force, at the writer level: replaced by name, nothing else deleted.
    writer = _writer.CheckpointWriter(
        _writer.OutputLayout(str(other), [("w", np.dtype(np.float32), (2,))]), force=True
    )
    writer.write("w", 0, np.ones(2, np.float32))
    writer.commit()
    assert sorted(os.listdir(other)) == sorted(listing + ["model.safetensors"])
    assert (other / "notes.txt").read_text() == "keep me"
    np.testing.assert_array_equal(
        load_file(str(other / "their-00001-of-00001.safetensors"))["a"], theirs["a"]
    )
    assert list(pst.load(str(other))) == ["w"]


def test_a_dry_run_meets_the_refusals_of_the_merge(tmp_path):
    """plan_merge, polyak.plan and ``polyak merge --dry-run`` refuse a folder the merge would
    refuse (without force), accept what it accepts, and change nothing either way."""
    from polyak import _merge

    inputs = _sharded_inputs(str(tmp_path), elements=1000)
    notes = tmp_path / "notes_only"
    notes.mkdir()
    (notes / "README").write_text("mine")
    for plan in (
        lambda **kw: pst.plan_merge(inputs, [str(notes)], [None], **kw),
        lambda **kw: _merge.plan(inputs, str(notes), **kw)[0],
    ):
        with pytest.raises(pst.OutputError, match="not empty .* force=True"):
            plan()
        assert plan(force=True).bytes_to_write[0] > 0
    cli = [sys.executable, "-m", "polyak", "merge", *inputs, "-o", str(notes), "--dry-run"]
    proc = subprocess.run(cli, capture_output=True, text=True, env=_env())
    assert proc.returncode != 0 and "not empty" in proc.stderr, proc.stderr
    proc = subprocess.run([*cli, "--force"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0 and "nothing was written" in proc.stdout, proc.stderr
    assert sorted(os.listdir(notes)) == ["README"]
    # A previous polyak output is replaced without force: the plan accepts it too.
    previous = str(tmp_path / "previous")
    pst.merge(inputs, previous)
    listing = sorted(os.listdir(previous))
    assert pst.plan_merge(inputs, [previous], ["linear"]).bytes_to_write
    assert sorted(os.listdir(previous)) == listing


def test_a_missing_file_to_copy_fails_the_estimate_as_it_fails_the_write(tmp_path):
    """The dry run's size counts the copied files, so a vanished one fails it with the
    merge's own message; the merge leaves nothing under the output name."""
    gone = str(tmp_path / "gone.json")
    out = str(tmp_path / "out")
    layout = _writer.OutputLayout(
        out, [("w", np.dtype(np.float32), (2,))], extra_files=[(gone, "config.json")]
    )
    with pytest.raises(pst.OutputError, match="cannot copy .*gone.json") as estimate:
        layout.nbytes()
    with pytest.raises(pst.OutputError) as write:
        _writer.CheckpointWriter(layout)
    assert str(write.value) == str(estimate.value)
    assert not os.path.exists(out)


def test_a_legal_255_byte_output_name_works(tmp_path):
    inputs = _sharded_inputs(str(tmp_path), elements=100)
    name = "m" * (255 - len(".safetensors")) + ".safetensors"
    assert len(name.encode()) == 255
    out = str(tmp_path / name)
    pst.merge(inputs, out)
    assert sorted(load_file(out)) == ["layer0.w", "layer1.w", "layer2.w"]
    folder = str(tmp_path / ("d" * 255))
    pst.merge(inputs, folder)
    assert _same(_official_load(folder), pst.load(folder))


def _slow_child(out: str, inputs: list[str], stop_after: int) -> str:
    """A merge that signals its parent (prints) after ``stop_after`` writes and then blocks."""
    return textwrap.dedent(f"""
        import sys
        import polyak.safetensors as pst
        from polyak.safetensors import _writer
        _writer._tmpfile_works = lambda d: False  # named temporaries, which need cleaning
        original = _writer.SafetensorsWriter.write
        count = [0]
        def write(self, name, start, array):
            original(self, name, start, array)
            count[0] += 1
            if count[0] == {stop_after}:
                print("writing", flush=True)
                sys.stdin.read()  # until the parent signals
        _writer.SafetensorsWriter.write = write
        pst.merge({inputs!r}, {out!r}, threads=1)
    """)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_sigterm_and_sighup_leave_no_temporary_and_no_lock(tmp_path, sig, kind):
    inputs = _sharded_inputs(str(tmp_path), elements=200_000)
    out = str(tmp_path / ("out.safetensors" if kind == "file" else "out"))
    proc = subprocess.Popen(
        [sys.executable, "-c", _slow_child(out, inputs, 2)],
        env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout.readline() == "writing\n", proc.stderr.read()
    assert _leftovers(tmp_path, inputs)  # the lock, the staging folder or temporary file
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode == -sig
    assert _leftovers(tmp_path, inputs) == []


def test_named_temporaries_of_a_live_writer_are_never_deleted(tmp_path, monkeypatch):
    """Temporaries are cleaned only by the holder of the output's lock; a writer that cannot
    take it (another process, whatever its PID namespace) touches nothing."""
    monkeypatch.setattr(_writer, "_tmpfile_works", lambda d: False)  # named temporaries
    out = str(tmp_path / "out.safetensors")
    first = _writer.CheckpointWriter(
        _writer.OutputLayout(out, [("w", np.dtype(np.float32), (1000,))])
    )
    try:
        temps = _hidden_temps(str(tmp_path))
        assert len(temps) == 2  # the lock and the named temporary
        sizes = {t: os.path.getsize(tmp_path / t) for t in temps}
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(f"""
                import numpy as np
                import polyak.safetensors as pst
                pst.save({{"w": np.zeros(1000, np.float32)}}, {out!r})
            """)],
            env=_env(), capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 1 and "being written by another merge" in proc.stderr
        assert {t: os.path.getsize(tmp_path / t) for t in temps} == sizes
        first.write("w", 0, np.full(1000, 7, np.float32))
        first.commit()
    except BaseException:
        first.abort()
        raise
    assert load_file(out)["w"][0] == 7 and _hidden_temps(str(tmp_path)) == []


def test_unnamed_temporary_files_are_used_on_linux(tmp_path):
    """O_TMPFILE + linkat(AT_SYMLINK_FOLLOW): a plain os.link of /proc/self/fd/N fails with
    EXDEV in some sandboxes, which made the writer fall back to named files."""
    if not hasattr(os, "O_TMPFILE"):
        pytest.skip("no O_TMPFILE on this system")
    assert _writer._tmpfile_works(str(tmp_path))
    out = str(tmp_path / "x.safetensors")
    w = _writer.CheckpointWriter(_writer.OutputLayout(out, [("w", np.dtype(np.float32), (10,))]))
    try:
        # Only the lock is visible while writing: a SIGKILL leaves no data behind.
        assert [os.path.getsize(tmp_path / t) for t in _hidden_temps(str(tmp_path))] == [0]
        w.write("w", 0, np.ones(10, np.float32))
        w.commit()
    except BaseException:
        w.abort()
        raise
    assert os.listdir(tmp_path) == ["x.safetensors"]
