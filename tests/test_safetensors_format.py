"""safetensors load/save: round trips against the official library, strict header checks."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyak
import polyak.safetensors as pst
from polyak.safetensors import CheckpointError, HeaderError

safetensors_numpy = pytest.importorskip("safetensors.numpy")

NUMPY_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.uint8, np.int16, np.uint16,
                np.int32, np.uint32, np.int64, np.uint64, np.bool_]  # fmt: skip
ML_DTYPES = [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]


def _sample(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 3).astype(dtype)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def test_official_writer_to_polyak_reader(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        f"t{i}.{np.dtype(d).name}": _sample(rng, d, (3, 5)) for i, d in enumerate(NUMPY_DTYPES)
    }
    tensors["scalar"] = np.array(2.5, np.float32)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    path = str(tmp_path / "official.safetensors")
    safetensors_numpy.save_file(tensors, path, metadata={"format": "np", "who": "official"})
    got = pst.load(path)
    assert sorted(got) == sorted(tensors)
    for name, arr in tensors.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        assert np.array_equal(got[name], arr), name
    assert pst.read_metadata(path) == {"format": "np", "who": "official"}


def test_polyak_writer_to_official_reader(tmp_path):
    rng = np.random.default_rng(1)
    tree = {
        "dense": {"kernel": _sample(rng, np.float32, (4, 3)), "bias": _sample(rng, np.float64, 3)},
        "ints": [_sample(rng, d, 7) for d in (np.int8, np.uint16, np.int64)],
        "mask": _sample(rng, np.bool_, (2, 2)),
        "step": np.int64(12),
        "zero_size": np.zeros((3, 0), np.float16),
    }
    path = str(tmp_path / "ours.safetensors")
    pst.save(tree, path, {"note": "hello"})
    official = safetensors_numpy.load_file(path)
    assert sorted(official) == sorted(
        ["dense.kernel", "dense.bias", "ints.0", "ints.1", "ints.2", "mask", "step", "zero_size"]
    )
    expected = {
        "dense.kernel": tree["dense"]["kernel"], "dense.bias": tree["dense"]["bias"],
        **{f"ints.{i}": a for i, a in enumerate(tree["ints"])},
        "mask": tree["mask"], "step": np.asarray(tree["step"]), "zero_size": tree["zero_size"],
    }  # fmt: skip
    for name, arr in expected.items():
        assert official[name].dtype == arr.dtype and official[name].shape == arr.shape, name
        assert _bits(official[name]) == _bits(arr), name
    assert official["step"].shape == () and official["step"] == 12
    assert safetensors_numpy.safe_open(path, "np").metadata() == {"note": "hello"}
    # The data starts 8-byte aligned, as the official writer lays it out.
    (n,) = struct.unpack("<Q", open(path, "rb").read(8))
    assert (8 + n) % 8 == 0


def test_bf16_and_fp8_round_trip_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "f8e4m3": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "f8e5m2": torch.randn(9, generator=g).to(torch.float8_e5m2),
        "f16": torch.randn(3, generator=g).to(torch.float16),
        "counter": torch.tensor(41),
    }
    path = str(tmp_path / "torch.safetensors")
    save_file(tensors, path)
    got = pst.load(path)
    assert got["bf16"].dtype == ml_dtypes.bfloat16
    assert np.array_equal(got["bf16"].astype(np.float32), tensors["bf16"].float().numpy())
    assert got["f8e4m3"].dtype == ml_dtypes.float8_e4m3fn
    assert np.array_equal(got["f8e4m3"].astype(np.float32), tensors["f8e4m3"].float().numpy())
    assert np.array_equal(got["f8e5m2"].astype(np.float32), tensors["f8e5m2"].float().numpy())
    assert int(got["counter"]) == 41
    # Back through polyak (torch tensors and the numpy copies) to torch's reader.
    for source, name in ((tensors, "from_torch"), (got, "from_numpy")):
        out = str(tmp_path / f"{name}.safetensors")
        pst.save(source, out)
        back = load_file(out)
        for key, t in tensors.items():
            assert back[key].dtype == t.dtype, (name, key)
            assert back[key].shape == t.shape, (name, key)
            flat_b, flat_t = back[key].reshape(-1), t.reshape(-1)
            assert bool((flat_b.view(torch.uint8) == flat_t.view(torch.uint8)).all()), key


def test_save_accepts_jax_arrays(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    path = str(tmp_path / "jax.safetensors")
    pst.save({"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)}, path)
    got = pst.load(path)["w"]
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == (2, 3)
    assert np.array_equal(got.astype(np.float32), np.arange(6).reshape(2, 3))


def test_nested_load_and_conflicts(tmp_path):
    path = str(tmp_path / "n.safetensors")
    pst.save({"a": {"b": np.ones(2), "c": {"d": np.zeros(1)}}, "e": np.arange(3)}, path)
    tree = pst.load(path, nested=True)
    assert set(tree) == {"a", "e"} and set(tree["a"]) == {"b", "c"}
    assert np.array_equal(tree["a"]["c"]["d"], np.zeros(1))
    clash = str(tmp_path / "clash.safetensors")
    safetensors_numpy.save_file({"a": np.ones(1), "a.b": np.ones(1)}, clash)
    assert set(pst.load(clash)) == {"a", "a.b"}
    with pytest.raises(polyak.StructureError, match="'a'"):
        pst.load(clash, nested=True)


def test_save_errors(tmp_path):
    path = str(tmp_path / "x.safetensors")
    with pytest.raises(polyak.DtypeError, match="'c'.*complex"):
        pst.save({"c": np.ones(2, np.complex128)}, path)
    with pytest.raises(polyak.StructureError, match="'a.b'"):
        pst.save({"a.b": np.ones(1), "a": {"b": np.ones(1)}}, path)
    with pytest.raises(HeaderError, match="metadata"):
        pst.save({"a": np.ones(1)}, path, {"k": 1})
    assert os.listdir(tmp_path) == []


def test_sharded_save_and_load(tmp_path):
    rng = np.random.default_rng(2)
    tree = {f"layer{i}": _sample(rng, np.float32, (64, 64)) for i in range(5)}
    out = tmp_path / "sharded"
    pst.save(tree, str(out), {"format": "pt"}, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 5 and shards[0] == "model-00001-of-00005.safetensors"
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    got = pst.load(str(out))
    for name, arr in tree.items():
        assert np.array_equal(got[name], arr)
    for shard in shards:  # every shard is a valid file for the official reader
        safetensors_numpy.load_file(str(out / shard))
    # Sizes as merge takes them; refused where they would be ignored or meaningless.
    pst.save(tree, str(tmp_path / "by_text"), max_shard_size="20KB")
    assert len(os.listdir(tmp_path / "by_text")) == 6  # 5 shards + index
    for path, size, message in [
        (tmp_path / "one.safetensors", 20_000, "applies to a directory output"),
        (tmp_path / "zero", 0, "must be positive"),
        (tmp_path / "neg", -1, "must be positive"),
        (tmp_path / "text", "lots", "is not a size"),
    ]:
        with pytest.raises(polyak.PolyakError, match=message):
            pst.save(tree, str(path), max_shard_size=size)
        assert not path.exists()


def test_sharded_directory_from_hf_layout(tmp_path):
    """A directory written shard by shard with the official library plus an HF index."""
    rng = np.random.default_rng(3)
    parts = [
        {"a": _sample(rng, np.float32, 4)},
        {"b": _sample(rng, np.float16, 6), "c": np.arange(2)},
    ]
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for part, name in zip(parts, names, strict=True):
        safetensors_numpy.save_file(part, str(tmp_path / name), metadata={"format": "pt"})
    weight_map = {k: name for part, name in zip(parts, names, strict=True) for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 36}, "weight_map": weight_map})
    )
    got = pst.load(str(tmp_path))
    assert sorted(got) == ["a", "b", "c"]
    assert np.array_equal(got["b"], parts[1]["b"])
    # An index naming a tensor no shard holds, or a shard outside the folder, is refused.
    bad = dict(weight_map, d=names[0])
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": bad}))
    with pytest.raises(HeaderError, match="'d'"):
        pst.load(str(tmp_path))
    evil = dict(weight_map, a="../model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": evil}))
    with pytest.raises(HeaderError, match="plain"):
        pst.load(str(tmp_path))
    # A tensor in two shards: the index maps it to one, so the other shard is refused, and
    # no descriptor of the shards opened so far stays open.
    safetensors_numpy.save_file(
        {**parts[1], "a": parts[0]["a"]}, str(tmp_path / names[1]), metadata={"format": "pt"}
    )
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(HeaderError, match=f"{names[1]}: tensor 'a' is not mapped to this shard"):
        pst.load(str(tmp_path))
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds


def test_missing_and_non_checkpoint_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        pst.load(str(tmp_path / "nope.safetensors"))
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="2 .safetensors files"):
        pst.load(str(tmp_path))


# -- strict headers -------------------------------------------------------------------------


def _file(header: dict | bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if declared is None else declared
    return struct.pack("<Q", n) + text + data


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_FILES = {
    "empty file": (b"", "too small"),
    "huge header length": (struct.pack("<Q", 2**62) + b"{}", "exceeds"),
    "header past end": (_file({}, declared=1000), "past the end"),
    "not utf-8": (_file(b"\xff\xfe{}  "), "UTF-8"),
    "not json": (_file(b"{nope}"), "not valid JSON"),
    "not an object": (_file(b"[1, 2]"), "start with"),
    "duplicate key": (
        _file(
            b'{"a":'
            + json.dumps(_entry()).encode()
            + b',"a":'
            + json.dumps(_entry()).encode()
            + b"}",
            bytes(8),
        ),
        "duplicate",
    ),  # fmt: skip
    "unknown dtype": (_file({"a": _entry("C128")}, bytes(8)), "dtype"),
    "bad shape": (_file({"a": _entry(shape=(-2,))}, bytes(8)), "shape"),
    "bool shape": (_file({"a": _entry(shape=(True, 2))}, bytes(8)), "shape"),
    "size mismatch": (_file({"a": _entry(shape=(3,))}, bytes(8)), "needs 12 bytes"),
    "offsets outside": (_file({"a": _entry(offsets=(0, 16))}, bytes(8)), "outside"),
    "reversed offsets": (_file({"a": _entry(offsets=(8, 0))}, bytes(8)), "outside"),
    "overlap": (
        _file({"a": _entry(), "b": _entry(shape=(1,), offsets=(4, 8))}, bytes(8)),
        "overlaps",
    ),  # fmt: skip
    "gap": (_file({"a": _entry(shape=(1,), offsets=(4, 8))}, bytes(8)), "gap"),
    "trailing bytes": (_file({"a": _entry()}, bytes(12)), "trailing"),
    "truncated data": (_file({"a": _entry()}, bytes(5)), "outside"),
    "extra key": (_file({"a": {**_entry(), "x": 1}}, bytes(8)), "exactly the keys"),
    "metadata not strings": (_file({"__metadata__": {"a": 1}}), "__metadata__"),
    "deep nesting": (_file(b"{" + b'"a":[' * 50_000 + b"]" * 50_000 + b"}"), "JSON"),
    "huge shape": (_file({"a": _entry(shape=(2**40, 2**40))}, bytes(8)), "overflows"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_headers_are_rejected(tmp_path, case):
    content, message = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(HeaderError, match=message) as err:
        pst.load(str(path))
    assert str(path) in str(err.value)


def _real_file(tmp_path) -> bytes:
    path = str(tmp_path / "real.safetensors")
    rng = np.random.default_rng(5)
    pst.save(
        {"w": _sample(rng, np.float32, (3, 4)), "b": _sample(rng, ml_dtypes.bfloat16, 5),
         "step": np.int64(3)},
        path,
        {"format": "np"},
    )  # fmt: skip
    return open(path, "rb").read()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_bytes_rejected_cleanly_or_read_consistently(tmp_path, data):
    """Mutated real files: polyak either raises HeaderError, or reads what the official
    reader reads. Never another exception, a hang or a large allocation."""
    original = _real_file(tmp_path)
    content = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(0, len(content) - 1)))
        if op == "flip" and content:
            content[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and content:
            content[pos] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del content[pos:]
        elif op == "insert":
            content[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del content[pos : pos + data.draw(st.integers(1, 8))]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(content))
    _check_clean(str(path), len(content))


def _check_clean(path: str, size: int) -> None:
    tracemalloc.start()
    try:
        try:
            got = pst.load(path)
        except HeaderError as e:
            assert path in str(e)
            got = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * size + (1 << 20), f"allocated {peak} bytes for a {size}-byte file"
    if got is not None:
        official = _official_load(path)
        assert sorted(official) == sorted(got)
        for k, v in got.items():
            shape, bits = official[k]
            assert shape == v.shape and bits == _bits(v), k


def _official_load(path: str) -> dict[str, tuple[tuple[int, ...], bytes]]:
    """(shape, raw bytes) per tensor, read by the official library.

    Its numpy reader knows no bf16/fp8 (numpy has no such dtypes), so files holding them are
    read through its torch reader when torch is there.
    """
    with safetensors_numpy.safe_open(path, "np") as f:
        header_dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    if any(d in ("BF16", "F8_E4M3", "F8_E5M2") for d in header_dtypes.values()):
        torch = pytest.importorskip("torch")
        from safetensors.torch import load_file

        return {
            k: (tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            for k, t in load_file(path).items()
        }
    return {k: (a.shape, _bits(a)) for k, a in safetensors_numpy.load_file(path).items()}


def _header_strategy():
    ints = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70), st.booleans())
    anything = st.recursive(
        st.one_of(st.none(), ints, st.floats(), st.text(max_size=5)),
        lambda c: st.one_of(
            st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c, max_size=3)
        ),
        max_leaves=8,
    )
    entry = st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "BF16", "I64", "BOOL", "F8_E4M3", "C64", "X", 3]),
            "shape": st.one_of(st.lists(ints, max_size=3), anything),
            "data_offsets": st.one_of(st.lists(ints, min_size=2, max_size=2), anything),
        }
    )
    return st.dictionaries(st.text(max_size=6), st.one_of(entry, anything), max_size=4)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(header=_header_strategy(), data_len=st.integers(0, 64), declared_delta=st.integers(-3, 3))
def test_generated_headers_rejected_cleanly(tmp_path, header, data_len, declared_delta):
    text = json.dumps(header).encode()
    declared = max(0, len(text) + (declared_delta if declared_delta in (-3, 3) else 0))
    path = tmp_path / "gen.safetensors"
    content = _file(text, bytes(range(data_len)), declared=declared)
    path.write_bytes(content)
    _check_clean(str(path), len(content))
