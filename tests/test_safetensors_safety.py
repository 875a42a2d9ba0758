"""Crash safety and memory of the merge, checked in real subprocesses.

A merge killed mid-write leaves no output and intact inputs; a write failing for lack of space
(RLIMIT_FSIZE) raises a clear error and leaves nothing behind; peak RSS stays bounded for
inputs much larger than the bound.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import polyak.safetensors as pst
from polyak.safetensors import _writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux process limits")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _inputs(folder, n, elements, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"in_{i}.safetensors")
        tree = {
            "big": rng.random(elements, dtype=np.float32),
            "small": rng.random(1000, dtype=np.float32),
            "step": np.int64(i),
        }
        pst.save(tree, p)
        paths.append(p)
    return paths


def _run(code: str, *, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_sigkill_mid_write_leaves_no_output_and_intact_inputs(tmp_path):
    paths = _inputs(str(tmp_path), 3, 2_000_000)
    digests = [_digest(p) for p in paths]
    out = str(tmp_path / "merged.safetensors")
    # The child kills itself with SIGKILL after a few output chunks have been written:
    # no handler, no finally block runs, exactly as with `kill -9` or the OOM killer.
    code = f"""
        import os, signal
        import polyak.safetensors as pst
        from polyak.safetensors import _writer
        original = _writer.SafetensorsWriter.write
        count = [0]
        def write(self, name, start, array):
            original(self, name, start, array)
            count[0] += 1
            if count[0] == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        _writer.SafetensorsWriter.write = write
        pst.merge({paths!r}, {out!r}, "linear", threads=1)
        print("not killed")
    """
    proc = _run(code)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "not killed" not in proc.stdout
    assert not os.path.exists(out)
    assert [_digest(p) for p in paths] == digests
    leftovers = sorted(set(os.listdir(tmp_path)) - {os.path.basename(p) for p in paths})
    # Only hidden ".polyak-*" names may remain: the (empty) lock file and, where the file system
    # has no unnamed temporary files, a temporary; the next write of that output removes them.
    assert all(f.startswith(".polyak-") for f in leftovers), leftovers
    if _writer._tmpfile_works(str(tmp_path)):  # Linux O_TMPFILE: no data left behind at all
        assert sum(os.path.getsize(tmp_path / f) for f in leftovers) == 0
    report = pst.merge(paths, out, "linear")
    assert os.path.exists(out) and report.tensors == 3
    assert sorted(os.listdir(tmp_path)) == sorted(
        [os.path.basename(p) for p in paths] + [os.path.basename(out)]
    )


# The child lowers its own limit first thing (a preexec_fn would force a plain fork of this
# multithreaded test process). Python ignores SIGXFSZ, so writes past it fail with EFBIG.
LIMIT = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))"


@pytest.mark.parametrize("target", ["file", "directory"])
def test_file_size_limit_gives_clear_error_and_leaves_nothing(tmp_path, target):
    paths = _inputs(str(tmp_path), 2, 500_000)
    digests = [_digest(p) for p in paths]
    out = str(tmp_path / ("merged.safetensors" if target == "file" else "merged_dir"))
    code = f"""
        {LIMIT}
        import errno, sys
        import polyak.safetensors as pst
        try:
            pst.merge({paths!r}, {out!r})
        except pst.OutputWriteError as e:
            print("ERRNO", e.errno == errno.EFBIG, file=sys.stderr)
            print(e, file=sys.stderr)
            sys.exit(3)
    """
    proc = _run(code)  # the output is ~2 MB
    assert proc.returncode == 3, proc.stderr
    assert "ERRNO True" in proc.stderr
    assert "file size limit" in proc.stderr and "nothing was written" in proc.stderr
    assert [_digest(p) for p in paths] == digests
    names = set(os.listdir(tmp_path)) - {os.path.basename(p) for p in paths}
    assert names == set()  # not even the output folder, which the failed merge created


def test_file_size_limit_through_the_cli(tmp_path):
    paths = _inputs(str(tmp_path), 2, 500_000)
    out = str(tmp_path / "merged.safetensors")
    argv = ["polyak", "merge", *paths, "-o", out]
    proc = _run(f"""
        {LIMIT}
        import runpy, sys
        sys.argv = {argv!r}
        runpy.run_module("polyak", run_name="__main__")
    """)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("polyak: error: cannot write")
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(out)


def test_peak_rss_bounded_for_inputs_much_larger(tmp_path):
    """4 inputs of 64 MiB (256 MiB in all, plus a 64 MiB output) merged under 100 MiB RSS."""
    paths = _inputs(str(tmp_path), 4, 16 << 20)
    out = str(tmp_path / "merged.safetensors")
    code = f"""
        import sys
        import polyak.safetensors as pst
        r = pst.merge({paths!r}, {out!r}, "exponential", threads=2)
        print(r.bytes_read, flush=True)
        sys.stdin.read()  # stay alive until the parent has read our memory high-water mark
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=_env(), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        # VmHWM: the kernel's peak resident set of the child's address space (file-mapped
        # pages included), read from outside. getrusage's ru_maxrss cannot be used here: a
        # child forked from this (large) pytest process inherits the parent's peak.
        with open(f"/proc/{proc.pid}/status") as f:
            status = dict(ln.split(":", 1) for ln in f.read().splitlines() if ":" in ln)
    finally:
        _, err = proc.communicate(input="", timeout=60)  # closes stdin: the child exits
    assert proc.returncode == 0, err
    peak = int(status["VmHWM"].split()[0]) * 1024
    bytes_read = int(line)
    assert bytes_read >= 4 * (64 << 20)
    print(f"merge peak RSS {peak / 2**20:.1f} MiB")
    assert peak < 100 * 2**20, f"peak RSS {peak / 2**20:.1f} MiB"
    # Spot-check the result against a float64 reference computed here.
    import polyak

    w = polyak.weights("exponential", 4)
    expected = np.zeros(1000, np.float64)
    for wi, p in zip(w, paths, strict=True):
        with pst.Checkpoint(p) as ck:
            x = np.empty(1000, np.float32)
            ck.read("big", 5_000_000, x)
        expected += wi * x.astype(np.float64)
    with pst.Checkpoint(out) as ck:
        sample = np.empty(1000, np.float32)
        ck.read("big", 5_000_000, sample)
    assert np.allclose(sample, expected, rtol=1e-6, atol=0)
    for p in paths + [out]:
        os.unlink(p)


def test_disk_full_mid_write_cleans_up(tmp_path, monkeypatch):
    """ENOSPC from a write in the middle of the merge (a disk that fills up meanwhile)."""
    import errno

    from polyak.safetensors import _writer

    paths = _inputs(str(tmp_path), 2, 300_000)
    out = str(tmp_path / "merged.safetensors")
    real_pwrite = os.pwrite
    calls = [0]

    def pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(_writer.os, "pwrite", pwrite)
    with pytest.raises(pst.OutputWriteError, match="disk is full") as err:
        pst.merge(paths, out, threads=2)
    assert err.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["in_0.safetensors", "in_1.safetensors"]


def test_merge_many_failing_late_on_one_output_leaves_none(tmp_path, monkeypatch):
    """A full disk reported by the last output's fsync: the outputs before it must not stay."""
    import errno

    from polyak.safetensors import _writer

    paths = _inputs(str(tmp_path), 2, 10_000)
    outs = [str(tmp_path / f"out_{k}.safetensors") for k in range(3)]
    real_sync = _writer.SafetensorsWriter.sync

    def sync(self):
        if self.path.endswith("out_2.safetensors"):
            self.abort()
            raise _writer._write_error(self.path, OSError(errno.ENOSPC, "No space left"))
        return real_sync(self)

    monkeypatch.setattr(_writer.SafetensorsWriter, "sync", sync)
    with pytest.raises(pst.OutputWriteError, match="out_2.*disk is full"):
        pst.merge_many(paths, outs, [[1, 0], [0, 1], [1, 1]])
    assert sorted(os.listdir(tmp_path)) == ["in_0.safetensors", "in_1.safetensors"]


def test_failed_directory_merge_removes_the_folder_it_made(tmp_path, monkeypatch):
    import errno

    from polyak.safetensors import _writer

    paths = _inputs(str(tmp_path), 2, 10_000)
    made, kept = tmp_path / "new_dir", tmp_path / "old_dir"
    kept.mkdir()  # an empty folder it did not make
    real_sync = _writer.SafetensorsWriter.sync

    def sync(self):
        self.abort()
        raise _writer._write_error(self.path, OSError(errno.ENOSPC, "No space left"))

    monkeypatch.setattr(_writer.SafetensorsWriter, "sync", sync)
    for out in (made, kept):
        with pytest.raises(pst.OutputWriteError, match="disk is full"):
            pst.merge(paths, str(out))
    assert not made.exists()
    assert kept.is_dir() and os.listdir(kept) == []  # a folder it did not make is kept
    assert sorted(os.listdir(tmp_path)) == ["in_0.safetensors", "in_1.safetensors", "old_dir"]
    monkeypatch.setattr(_writer.SafetensorsWriter, "sync", real_sync)
    pst.merge(paths, str(made))  # and a successful merge keeps the folder it made
    assert (made / "model.safetensors.index.json").exists()
