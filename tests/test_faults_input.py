"""Hostile inputs give one clear error, never a hang, a crash or an unreadable output (issue 13).

Each test reproduces a failure of the former reader or writer: lone surrogates, shapes the
official reader rejects, NUL in shard names, FIFOs and /dev/zero, oversized headers, many
inputs under a low open-file limit, and per-input header state growing with the inputs.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors
from safetensors.numpy import save_file

import polyak.safetensors as pst
from polyak.safetensors import _writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _raw(path, header: str, data: bytes = b"") -> str:
    text = header.encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    return str(path)


def _official_rejects(path: str) -> bool:
    try:
        with safetensors.safe_open(path, framework="np") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:
        return True
    return False


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyak", *args],
        env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


LONE = {
    "lone surrogate in a name": '{"a\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "lone surrogate in metadata": (
        '{"__metadata__":{"x":"\\udc00"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    ),
}


@pytest.mark.parametrize("case", sorted(LONE))
def test_lone_surrogates_are_rejected_like_the_official_reader(tmp_path, case):
    bad = _raw(tmp_path / "bad.safetensors", LONE[case], bytes(8))
    assert _official_rejects(bad)
    with pytest.raises(pst.HeaderError, match="surrogate") as err:
        pst.load(bad)
    assert bad in str(err.value)
    good = str(tmp_path / "good.safetensors")
    pst.save({"a": np.zeros(2, np.float32)}, good)
    for args in (["merge", good, bad, "-o", str(tmp_path / "o.safetensors")], ["inspect", bad]):
        proc = _cli(*args)
        assert proc.returncode == 1 and proc.stderr.startswith("polyak: error:"), proc.stderr
        assert "surrogate" in proc.stderr and "Traceback" not in proc.stderr
    # A valid surrogate pair is an ordinary character, accepted by both readers.
    pair = _raw(
        tmp_path / "pair.safetensors",
        '{"a\\ud83d\\ude00":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        bytes(8),
    )
    assert not _official_rejects(pair) and list(pst.load(pair)) == ["a\U0001f600"]


SHAPES = {
    "overflow before a zero": [2**40, 2**40, 0],
    "65 dimensions": [1] * 65,
    "65 zero dimensions": [0] * 65,
    "zero with a dimension over 2**63": [0, 2**63],
    "zero with a huge product": [0, 2**40, 2**40],
}


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_shapes_the_official_reader_rejects_are_rejected_on_read(tmp_path, case):
    shape = SHAPES[case]
    size = int(np.prod(shape, dtype=object)) * 4
    header = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, size]}})
    bad = _raw(tmp_path / "bad.safetensors", header, bytes(size))
    assert _official_rejects(bad)
    with pytest.raises(pst.HeaderError, match="tensor 'a'") as err:
        pst.load(bad)
    assert bad in str(err.value)
    proc = _cli("merge", bad, bad, "-o", str(tmp_path / "o.safetensors"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_shapes_are_validated_on_write_too(tmp_path):
    """The writer refuses a header the official reader would reject, before any file exists."""
    out = str(tmp_path / "o.safetensors")
    for shape in ([2**40, 2**40, 0], [1] * 65):
        with pytest.raises(pst.HeaderError, match="tensor 'a'"):
            _writer.CheckpointWriter(
                _writer.OutputLayout(out, [("a", np.dtype(np.float32), tuple(shape))])
            )
    assert os.listdir(tmp_path) == []
    # The limits themselves are fine, and read back by the official reader.
    w = _writer.CheckpointWriter(
        _writer.OutputLayout(out, [("a", np.dtype(np.float32), (1,) * 64)])
    )
    w.write("a", 0, np.ones(1, np.float32))
    w.commit()
    assert not _official_rejects(out) and pst.load(out)["a"].shape == (1,) * 64


@pytest.mark.parametrize("shard", ["a\x00b.safetensors", "a\udcff.safetensors"])
def test_nul_or_surrogate_in_a_shard_name_is_a_clear_error(tmp_path, shard):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(d / "model-1.safetensors"))
    text = json.dumps({"weight_map": {"w": shard}})  # ensure_ascii: "\u0000", "\udcff"
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(pst.HeaderError, match="'w' maps to") as err:
        pst.load(str(d))
    assert "model.safetensors.index.json" in str(err.value)


_FIFO_CHILD = """
import sys
import polyak, polyak.checkpoints, polyak.safetensors as pst
path, how = sys.argv[1:]
try:
    if how == "load":
        pst.load(path)
    elif how == "detect":
        polyak.checkpoints.detect(path)
    else:
        polyak.checkpoints.TorchCheckpoint(path)
except ValueError as e:  # PolyakError
    print("error:", type(e).__name__, e)
"""


def _load_in_child(path: str, how: str = "load") -> subprocess.CompletedProcess:
    """Open ``path`` (``how``: pst.load, checkpoints.detect or TorchCheckpoint) in a child that
    is killed after 30 s if it hangs (it must not)."""
    return subprocess.run(
        [sys.executable, "-c", _FIFO_CHILD, path, how],
        env=_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_fifos_and_devices_are_refused_without_hanging(tmp_path):
    # A FIFO as the input file itself.
    fifo = str(tmp_path / "pipe.safetensors")
    os.mkfifo(fifo)
    proc = _load_in_child(fifo)
    assert "error:" in proc.stdout and "FIFO" in proc.stdout, proc.stderr
    # A FIFO as a shard, and as the index.
    for role in ("shard", "index"):
        d = tmp_path / role
        d.mkdir()
        weight_map = {"w": "model-1.safetensors"}
        if role == "shard":
            os.mkfifo(d / "model-1.safetensors")
            (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        else:
            save_file({"w": np.zeros(2, np.float32)}, str(d / "model-1.safetensors"))
            os.mkfifo(d / "model.safetensors.index.json")
        proc = _load_in_child(str(d))
        assert "error:" in proc.stdout and "FIFO" in proc.stdout, (role, proc.stderr)
    # An index that is a symlink to /dev/zero (an endless read).
    d = tmp_path / "zero"
    d.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(d / "model-1.safetensors"))
    os.symlink("/dev/zero", d / "model.safetensors.index.json")
    proc = _load_in_child(str(d))
    assert "error:" in proc.stdout and "not a regular" in proc.stdout, proc.stderr
    # The format-neutral readers: detecting a kind reads the file's head; a torch file.
    torch_fifo = str(tmp_path / "pipe.pt")
    os.mkfifo(torch_fifo)
    for path, how in ((fifo, "detect"), (torch_fifo, "detect"), (torch_fifo, "torch")):
        proc = _load_in_child(path, how)
        assert "error: CheckpointError" in proc.stdout and "FIFO" in proc.stdout, proc.stderr


def test_header_over_the_limit_is_refused_before_writing(tmp_path):
    """A header neither polyak nor the official reader could open is never written."""
    inp = str(tmp_path / "in.safetensors")
    pst.save({"w": np.zeros(2, np.float32)}, inp)
    out = str(tmp_path / "out.safetensors")
    huge = {"note": "x" * pst_limit()}
    with pytest.raises(pst.HeaderError, match="over the 100000000-byte limit"):
        pst.save({"w": np.zeros(2, np.float32)}, out, huge)
    with pytest.raises(pst.HeaderError, match="max_shard_size"):
        pst.merge_many([inp, inp], [out], [[1, 1]], metadata=[huge])
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def pst_limit() -> int:
    from polyak.safetensors._format import MAX_HEADER_BYTES

    return MAX_HEADER_BYTES


def test_many_inputs_under_a_low_open_file_limit(tmp_path):
    """300 inputs under `ulimit -n 64` (hard limit higher): the merge raises the soft limit;
    with the hard limit at 64 too, the error names the limit to raise."""
    paths = []
    for i in range(300):
        p = str(tmp_path / f"c{i}.safetensors")
        save_file({"w": np.full(3, i, np.float32)}, p)
        paths.append(p)
    out = str(tmp_path / "avg.safetensors")
    code = textwrap.dedent(f"""
        import resource, sys
        import polyak.safetensors as pst
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64 if sys.argv[1] == "hard" else hard))
        try:
            pst.merge({paths!r}, {out!r})
            print("merged")
        except pst.CheckpointError as e:
            print("error:", e)
    """)
    soft = subprocess.run(
        [sys.executable, "-c", code, "soft"], env=_env(), capture_output=True, text=True
    )
    assert soft.stdout.strip() == "merged", soft.stderr
    np.testing.assert_array_equal(pst.load(out)["w"], np.full(3, 149.5, np.float32))
    os.unlink(out)
    hard = subprocess.run(
        [sys.executable, "-c", code, "hard"], env=_env(), capture_output=True, text=True
    )
    assert "error:" in hard.stdout and "ulimit -n" in hard.stdout and "64" in hard.stdout, (
        hard.stdout + hard.stderr
    )
    assert not os.path.exists(out)


_MEMORY_CHILD = """
import gc, os, sys
import polyak.safetensors as pst

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

paths = sys.argv[2:2 + int(sys.argv[1])]
gc.collect()
before = rss()
opened = [pst.Checkpoint(p) for p in paths]
gc.collect()
print(rss() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_per_input_header_state_is_compact(tmp_path):
    """100k-tensor checkpoints: each extra open input costs far less than the ~50 MB of one
    Python object per tensor (measured in a fresh subprocess)."""
    tree = {f"model.layers.{i // 10}.w{i % 10}": np.zeros(1, np.float32) for i in range(100_000)}
    # One file opened 8 times: each open parses and keeps its own header state, as for 8
    # checkpoints of one run (same names, different files).
    path = str(tmp_path / "c.safetensors")
    save_file(tree, path)
    paths = [path] * 8

    def grow(n: int) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, str(n), *paths],
            env=_env(), capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(proc.stdout)

    per_input = (grow(8) - grow(2)) / 6
    assert per_input < 20 * 2**20, f"{per_input / 2**20:.1f} MiB per extra input"
