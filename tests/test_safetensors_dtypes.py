"""Every dtype the official safetensors library writes is read, written and merged by polyak."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

import polyak
import polyak.safetensors as pst

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")
st_numpy = pytest.importorskip("safetensors.numpy")

from polyak.checkpoints._dcp import torch_to_numpy  # noqa: E402

# safetensors code -> (torch dtype, numpy dtype polyak uses)
CODES = {
    "F64": (torch.float64, np.float64),
    "F32": (torch.float32, np.float32),
    "F16": (torch.float16, np.float16),
    "BF16": (torch.bfloat16, ml_dtypes.bfloat16),
    "F8_E4M3": (torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
    "F8_E5M2": (torch.float8_e5m2, ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": (torch.float8_e4m3fnuz, ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": (torch.float8_e5m2fnuz, ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": (torch.float8_e8m0fnu, ml_dtypes.float8_e8m0fnu),
    "C64": (torch.complex64, np.complex64),
    "I64": (torch.int64, np.int64),
    "I32": (torch.int32, np.int32),
    "I16": (torch.int16, np.int16),
    "I8": (torch.int8, np.int8),
    "U64": (torch.uint64, np.uint64),
    "U32": (torch.uint32, np.uint32),
    "U16": (torch.uint16, np.uint16),
    "U8": (torch.uint8, np.uint8),
    "BOOL": (torch.bool, np.bool_),
}


def _tensor(code, seed, shape=(4, 6)):
    tdtype, _ = CODES[code]
    g = torch.Generator().manual_seed(seed)
    if code == "F8_E8M0":
        return torch.randint(120, 135, shape, generator=g, dtype=torch.uint8).view(tdtype)
    if code == "BOOL":
        return torch.randint(0, 2, shape, generator=g).bool()
    if code.startswith(("I", "U")):
        return torch.randint(0, 100, shape, generator=g).to(tdtype)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if code == "C64":
        return torch.complex(x, -x).to(torch.complex64)
    return x.to(tdtype)


def _header(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def test_reads_every_dtype_written_by_safetensors_torch(tmp_path):
    tensors = {code: _tensor(code, i) for i, code in enumerate(CODES)}
    p = tmp_path / "all.safetensors"
    st_torch.save_file(tensors, str(p))
    assert {v["dtype"] for k, v in _header(p).items() if k != "__metadata__"} == set(CODES)
    got = pst.load(p)
    for code, t in tensors.items():
        assert got[code].dtype == np.dtype(CODES[code][1]), code
        assert got[code].tobytes() == torch_to_numpy(t).tobytes(), code


def test_writes_every_dtype_readable_by_safetensors_torch(tmp_path):
    arrays = {code: torch_to_numpy(_tensor(code, i)) for i, code in enumerate(CODES)}
    p = tmp_path / "polyak.safetensors"
    pst.save(arrays, p)
    back = st_torch.load_file(str(p))
    for code, a in arrays.items():
        assert back[code].dtype == CODES[code][0], code
        assert torch_to_numpy(back[code]).tobytes() == a.tobytes(), code


def test_saves_torch_tensors_of_every_dtype_as_safetensors_torch_does(tmp_path):
    """pst.save takes torch tensors directly, float8 e8m0 and the fnuz types included
    (Tensor.numpy() refuses those); the official reader gets every tensor back bit for bit,
    with the dtype code and shape the official writer gives it."""
    tensors = {code: _tensor(code, i) for i, code in enumerate(CODES)}
    ours, theirs = tmp_path / "polyak.safetensors", tmp_path / "official.safetensors"
    pst.save(tensors, ours)
    st_torch.save_file(tensors, str(theirs))
    back = st_torch.load_file(str(ours))
    for code, t in tensors.items():
        assert back[code].dtype == t.dtype, code
        assert torch.equal(back[code].view(torch.uint8), t.view(torch.uint8)), code
    want = {k: (v["dtype"], v["shape"]) for k, v in _header(theirs).items() if k in CODES}
    assert {k: (v["dtype"], v["shape"]) for k, v in _header(ours).items()} == want


def test_complex64_round_trips_with_safetensors_numpy(tmp_path):
    x = (np.arange(6) + 1j * np.arange(6)[::-1]).astype(np.complex64)
    p = tmp_path / "c.safetensors"
    st_numpy.save_file({"c": x}, str(p))
    np.testing.assert_array_equal(pst.load(p)["c"], x)
    pst.save({"c": x}, tmp_path / "c2.safetensors")
    np.testing.assert_array_equal(st_numpy.load_file(str(tmp_path / "c2.safetensors"))["c"], x)


def test_f4_is_packed_two_per_byte_low_nibble_first(tmp_path):
    # Bytes 0x72, 0xA0: e2m1 codes 2 (1.0) and 7 (6.0), then 0 (0.0) and 0xA (-1.0).
    packed = torch.tensor([[0x72, 0xA0]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    p = tmp_path / "f4.safetensors"
    st_torch.save_file({"q": packed}, str(p))
    assert _header(p)["q"]["shape"] == [1, 4]  # the official library counts values
    got = pst.load(p)["q"]
    assert got.dtype == np.dtype(ml_dtypes.float4_e2m1fn) and got.shape == (1, 4)
    assert got.astype(np.float32).tolist() == [[1.0, 6.0, 0.0, -1.0]]
    with pst.Checkpoint(p) as ck:  # an odd start inside a byte
        part = np.empty(2, ml_dtypes.float4_e2m1fn)
        ck.read("q", 1, part)
        assert part.astype(np.float32).tolist() == [6.0, 0.0]
    out = tmp_path / "f4_polyak.safetensors"
    pst.save({"q": got}, out)
    assert open(out, "rb").read()[-2:] == bytes([0x72, 0xA0])
    back = st_torch.load_file(str(out))["q"]
    assert back.dtype == torch.float4_e2m1fn_x2
    assert back.view(torch.uint8).tolist() == [[0x72, 0xA0]]


def _f4_file(path, values):
    codes = np.asarray(values, np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    packed = torch.from_numpy((codes[0::2] | (codes[1::2] << 4)).astype(np.uint8))
    st_torch.save_file({"q": packed.view(torch.float4_e2m1fn_x2)}, str(path))


@pytest.mark.parametrize("int_policy", ["last", "first", "average"])
def test_merge_averages_new_floats_once_and_e8m0_follows_int_policy(tmp_path, int_policy):
    paths = []
    for i in range(3):
        tensors = {
            code: _tensor(code, 10 * i + j)
            for j, code in enumerate(("F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64", "F8_E8M0"))
        }
        paths.append(tmp_path / f"c{i}.safetensors")
        st_torch.save_file(tensors, str(paths[-1]))
    out = tmp_path / "avg.safetensors"
    report = pst.merge(paths, out, int_policy=int_policy)
    got = pst.load(out)
    loaded = [pst.load(p) for p in paths]
    want = polyak.average(loaded, int_policy=int_policy)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k
    # Independent reference: the float64 mean, rounded once to the stored dtype.
    for code in ("F8_E4M3FNUZ", "F8_E5M2FNUZ"):
        ref = np.mean([x[code].astype(np.float64) for x in loaded], axis=0)
        # fp8 sums are exact in float32, so the one rounding matches float64's.
        assert got[code].tobytes() == ref.astype(got[code].dtype).tobytes(), code
    ref = np.mean([x["C64"].astype(np.complex128) for x in loaded], axis=0)
    np.testing.assert_allclose(got["C64"], ref, rtol=1e-6)  # complex64 accumulation
    e8 = [x["F8_E8M0"] for x in loaded]
    if int_policy == "last":
        assert got["F8_E8M0"].tobytes() == e8[-1].tobytes()
    elif int_policy == "first":
        assert got["F8_E8M0"].tobytes() == e8[0].tobytes()
    else:
        mean = np.mean([x.astype(np.float64) for x in e8], axis=0)
        assert got["F8_E8M0"].tobytes() == mean.astype(ml_dtypes.float8_e8m0fnu).tobytes()
    assert report.weights == pytest.approx((1 / 3,) * 3)
    # The report says which tensors were not averaged but followed int_policy.
    assert report.scales == ("F8_E8M0",)
    assert "1 F8_E8M0 scale tensors followed int_policy" in str(report)


def test_merge_of_f4_files_matches_float64_reference(tmp_path):
    vals = [[1.0, 6.0, -0.5, 2.0] * 8, [3.0, 6.0, 0.5, 2.0] * 8, [2.0, -6.0, 1.5, 4.0] * 8]
    paths = []
    for i, v in enumerate(vals):
        paths.append(tmp_path / f"f{i}.safetensors")
        _f4_file(paths[-1], v)
    out = tmp_path / "avg.safetensors"
    pst.merge(paths, out)
    got = pst.load(out)["q"]
    ref = np.mean(np.asarray(vals, np.float64), axis=0).astype(ml_dtypes.float4_e2m1fn)
    assert got.tobytes() == ref.tobytes()
    back = st_torch.load_file(str(out))["q"]  # the official reader accepts polyak's packing
    assert back.dtype == torch.float4_e2m1fn_x2 and back.numel() == len(vals[0]) // 2


def test_odd_number_of_f4_values_is_a_header_error(tmp_path):
    p = tmp_path / "bad.safetensors"
    head = json.dumps({"q": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}).encode()
    head += b" " * (-len(head) % 8)
    p.write_bytes(struct.pack("<Q", len(head)) + head + b"\x00\x00")
    with pytest.raises(pst.HeaderError, match="odd number of values"):
        pst.load(p)
