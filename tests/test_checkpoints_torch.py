"""torch.save zip checkpoints read by polyak.checkpoints, checked against torch.load itself."""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import polyak  # noqa: E402
from polyak import _stream  # noqa: E402
from polyak.checkpoints import (  # noqa: E402
    CheckpointError,
    KeyChoiceError,
    TorchCheckpoint,
    UnsafeCheckpointError,
    detect,
    open_checkpoint,
)
from polyak.checkpoints._dcp import torch_to_numpy  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _every_dtype_state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 6, generator=g)
    sd = {
        "f32": torch.randn(3, 4, generator=g),
        "view_with_offset": base[2:5],  # a view into a bigger storage
        "tied_whole": base,  # tied weights: two tensors over one storage
        "f64": torch.randn(3, dtype=torch.float64, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "c64": torch.randn(3, dtype=torch.complex64, generator=g),
        "c128": torch.randn(3, dtype=torch.complex128, generator=g),
        "i64": torch.arange(5),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),
        "u32": torch.tensor([0, 1, 7], dtype=torch.int64).to(torch.uint32),
        "u64": torch.tensor([0, 1, 9]).to(torch.uint64),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, generator=g)),
    }
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
        sd[name] = torch.randn(6, generator=g).to(getattr(torch, name))
    sd["float8_e8m0fnu"] = torch.tensor([0.25, 1.0, 8.0]).to(torch.float8_e8m0fnu)
    return sd


def test_every_dtype_matches_torch_load_bit_for_bit(tmp_path):
    sd = _every_dtype_state_dict()
    p = tmp_path / "model.pt"
    torch.save(sd, p)
    ref = torch.load(p, weights_only=True)
    with TorchCheckpoint(p) as ck:
        assert ck.keys() == list(ref)
        for name, t in ref.items():
            got = ck.read_tensor(name)
            want = torch_to_numpy(t)
            assert ck.info(name) == (want.dtype, tuple(t.shape)), name
            assert got.tobytes() == want.tobytes(), name
        # A slice from the middle, as the stream reads it.
        part = np.empty(7, np.float32)
        ck.read("tied_whole", 20, part)
        np.testing.assert_array_equal(part, ref["tied_whole"].reshape(-1)[20:27].numpy())


def test_lightning_style_nested_checkpoint_needs_a_key(tmp_path):
    sd = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.randn(3)}
    ckpt = {
        "epoch": 4,
        "global_step": 100,
        "state_dict": sd,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
        "hyper_parameters": {"lr": 0.1, "name": "run"},
        "ema": {"inner": dict(sd)},
    }
    p = tmp_path / "last.ckpt"
    torch.save(ckpt, p)
    with pytest.raises(KeyChoiceError) as e:
        TorchCheckpoint(p)
    msg = str(e.value)
    assert "pass --key state_dict" in msg and "ema.inner" in msg and "'epoch'" in msg
    with TorchCheckpoint(p, key="state_dict") as ck:
        assert ck.keys() == list(sd)
        np.testing.assert_array_equal(ck.read_tensor("layer.weight"), sd["layer.weight"].numpy())
    with TorchCheckpoint(p, key="ema.inner") as ck:  # dotted key
        np.testing.assert_array_equal(ck.read_tensor("layer.bias"), sd["layer.bias"].numpy())
    with pytest.raises(KeyChoiceError, match="'hyper_parameters' holds 2 entries that are not"):
        TorchCheckpoint(p, key="hyper_parameters")
    with pytest.raises(KeyChoiceError, match="key 'model' not found"):
        TorchCheckpoint(p, key="model")


def test_mixed_top_level_names_the_non_tensor_entries(tmp_path):
    p = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2), "step": 3, "note": "x"}, p)
    with pytest.raises(KeyChoiceError, match=r"2 entries that are not tensors: 'note', 'step'"):
        TorchCheckpoint(p)


def test_non_contiguous_tensor_is_refused_clearly(tmp_path):
    p = tmp_path / "t.pt"
    torch.save({"wt": torch.randn(4, 3).t()}, p)
    with pytest.raises(CheckpointError, match=r"'wt'.*non-contiguous.*\.contiguous\(\)"):
        TorchCheckpoint(p)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, p)
    with pytest.raises(UnsafeCheckpointError, match=r"references posix\.system|os\.system"):
        open_checkpoint(p)
    with pytest.raises(UnsafeCheckpointError):
        TorchCheckpoint(p, key="w")
    assert not marker.exists()
    # The payload is live: an unrestricted load runs it (so the check above means something).
    torch.load(p, weights_only=False)
    assert marker.exists()


def test_arbitrary_class_is_refused(tmp_path):
    p = tmp_path / "cls.pt"
    torch.save({"w": torch.ones(2), "opt": torch.optim.SGD([torch.zeros(1)], lr=0.1)}, p)
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.optim\.sgd\.SGD"):
        TorchCheckpoint(p)


def _rewrite_zip(src, dst, change):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data, compress = change(info.filename, zin.read(info))
            zout.writestr(info.filename, data, compress_type=compress)


def test_big_endian_and_compressed_files_get_clear_errors(tmp_path):
    p = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4.0)}, p)
    big = tmp_path / "big.pt"
    _rewrite_zip(
        p, big, lambda n, d: (b"big" if n.endswith("byteorder") else d, zipfile.ZIP_STORED)
    )
    with pytest.raises(CheckpointError, match="big-endian"):
        TorchCheckpoint(big)
    packed = tmp_path / "deflated.pt"
    _rewrite_zip(p, packed, lambda n, d: (d, zipfile.ZIP_DEFLATED))
    with pytest.raises(CheckpointError, match="compressed"):
        TorchCheckpoint(packed)
    # Re-zipped but stored: still readable (offsets come from zipfile, not assumptions).
    stored = tmp_path / "stored.pt"
    _rewrite_zip(p, stored, lambda n, d: (d, zipfile.ZIP_STORED))
    with TorchCheckpoint(stored) as ck:
        np.testing.assert_array_equal(ck.read_tensor("w"), np.arange(4.0, dtype=np.float32))


def test_legacy_format_says_how_to_resave(tmp_path):
    p = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy.*re-save it in the zip format"):
        detect(p)


def test_detection_reads_content_not_names(tmp_path):
    import polyak.safetensors as pst

    pt = tmp_path / "weights.safetensors"  # a torch file under a safetensors name
    torch.save({"w": torch.ones(2)}, pt)
    assert detect(pt) == "torch"
    st = tmp_path / "weights.bin"
    pst.save({"w": np.ones(2, np.float32)}, str(st) + ".safetensors")
    os.rename(str(st) + ".safetensors", st)
    assert detect(st) == "safetensors"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello world, not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a checkpoint polyak can read"):
        detect(junk)


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import numpy as np
from polyak.checkpoints import open_checkpoint
with open_checkpoint(sys.argv[1], key="state_dict") as ck:
    for name in ck.keys():
        print(name, ck.read_tensor(name).astype(np.float64).tolist())
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
"""


def test_reads_torch_files_without_torch_installed(tmp_path):
    sd = {"a": torch.tensor([1.5, -2.0]), "b": torch.tensor([3.0]).bfloat16()}
    p = tmp_path / "m.pth.tar"
    torch.save({"state_dict": sd, "epoch": 1}, p)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(p)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["a [1.5, -2.0]", "b [3.0]"]


class _Collect:
    def __init__(self, plans):
        self.out = {p.name: np.empty(p.shape, p.out_dtype) for p in plans}

    def write(self, name, elem_start, array):
        flat = self.out[name].reshape(-1)
        flat[elem_start : elem_start + array.size] = array.reshape(-1)


def stream_average(readers, weights, **kw):
    """Run the stream core over readers, as polyak.safetensors.merge does."""
    plans = _stream.plan(readers, [str(i) for i in range(len(readers))])
    out = _Collect(plans)
    _stream.run(readers, [out], [np.asarray(weights, np.float64)], plans, threads=2, **kw)
    return out.out


def test_stream_merge_of_torch_files_equals_average_and_float64_reference(tmp_path):
    g = torch.Generator().manual_seed(1)
    sds = []
    paths = []
    for i in range(3):
        sd = {
            "w": torch.randn(300, 7, generator=g),
            "h": torch.randn(64, generator=g).bfloat16(),
            "steps": torch.tensor([i]),
        }
        sds.append(sd)
        paths.append(tmp_path / f"ckpt_{i}.pt")
        torch.save({"state_dict": sd, "epoch": i}, paths[-1])
    readers = [TorchCheckpoint(p, key="state_dict") for p in paths]
    got = stream_average(readers, [0.2, 0.3, 0.5], chunk_elements=256, span_bytes=1024)
    snaps = [{k: torch_to_numpy(v) for k, v in sd.items()} for sd in sds]
    want = polyak.average(snaps, [0.2, 0.3, 0.5])
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k
    ref = sum(w * sd["w"].double().numpy() for w, sd in zip([0.2, 0.3, 0.5], sds))
    np.testing.assert_allclose(got["w"], ref, rtol=1e-6, atol=1e-6)
    assert got["steps"].tolist() == [2]  # int_policy="last"


_RSS_SCRIPT = """
import gc, os, sys
import numpy as np
import psutil
from polyak import _stream
from polyak.checkpoints import open_checkpoint

paths = sys.argv[1:]
readers = [open_checkpoint(p, key="state_dict") for p in paths]
plans = _stream.plan(readers, paths)


class Discard:  # the output is not under test: only what reading the inputs costs
    def write(self, name, elem_start, array):
        pass


gc.collect()
base = psutil.Process().memory_info().rss
nread = _stream.run(readers, [Discard()], [np.full(len(paths), 1 / len(paths))], plans).bytes_read
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(peak - base, nread)
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc/self/status")
def test_streaming_three_torch_files_stays_far_below_one_input(tmp_path):
    pytest.importorskip("psutil")
    # 3 x 64 MiB instead of the 3 x 256 MiB, to keep CI's disk and time small; the
    # bound scales with it: under 48 MiB, less than one input, where torch.load (or mmap,
    # whose read pages count as resident) would hold at least one whole 64 MiB input.
    mib = 2**20
    paths = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        sd = {f"layer{j}.weight": torch.randn(2 * mib, generator=g) for j in range(8)}
        paths.append(str(tmp_path / f"ckpt_{i}.pt"))
        torch.save({"state_dict": sd, "epoch": i}, paths[-1])
        del sd
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, *paths],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    grown, nread = (int(x) for x in proc.stdout.split())
    assert nread == 3 * 64 * mib  # everything was read
    print(f"peak RSS grew by {grown / mib:.1f} MiB")
    assert grown < 48 * mib, f"peak RSS grew by {grown / mib:.1f} MiB"


def test_docstring_examples_run():
    import doctest

    import polyak.checkpoints as pc
    from polyak.checkpoints import _dcp, _hf, _open, _torchzip

    attempted = 0
    for module in (pc, _dcp, _hf, _open, _torchzip):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 8
