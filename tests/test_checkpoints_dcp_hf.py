"""DCP folders (torch.distributed.checkpoint.save) and Hugging Face model folders
(transformers save_pretrained), read by polyak.checkpoints and checked against the libraries."""

import json
import os

import pytest

torch = pytest.importorskip("torch")

from test_checkpoints_torch import stream_average  # noqa: E402

import polyak  # noqa: E402
from polyak.checkpoints import (  # noqa: E402
    DCPCheckpoint,
    KeyChoiceError,
    config_differences,
    detect,
    find_weights,
    model_files,
    open_checkpoint,
)
from polyak.checkpoints._dcp import torch_to_numpy  # noqa: E402


def _dcp_save(state, folder):
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder))


def test_dcp_folder_reads_tensor_by_tensor_and_merges(tmp_path):
    g = torch.Generator().manual_seed(0)
    sds, folders = [], []
    for i in range(3):
        sd = {
            "layer.weight": torch.randn(40, 9, generator=g),
            "layer.bias": torch.randn(9, generator=g).bfloat16(),
            "count": torch.tensor([i]),
        }
        sds.append(sd)
        folders.append(tmp_path / f"dcp{i}")
        _dcp_save({"model": sd, "step": 7 + i}, folders[-1])
    assert detect(folders[0]) == "dcp"
    with pytest.raises(KeyChoiceError, match="'step'.*pass --key model"):
        open_checkpoint(folders[0])
    readers = [open_checkpoint(f, key="model") for f in folders]
    assert isinstance(readers[0], DCPCheckpoint)
    assert sorted(readers[0].keys()) == sorted(sds[0])
    for name, t in sds[0].items():
        assert readers[0].read_tensor(name).tobytes() == torch_to_numpy(t).tobytes()
    got = stream_average(readers, [1 / 3] * 3, chunk_elements=64, span_bytes=256)
    want = polyak.average([{k: torch_to_numpy(v) for k, v in sd.items()} for sd in sds])
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k
    # Every tensor was served completely, so none is still held in memory.
    assert all(not r._loaded for r in readers)


transformers = pytest.importorskip("transformers")


def _tiny_gpt2(seed):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=32, tie_word_embeddings=True
    )
    return transformers.GPT2LMHeadModel(config).eval()


def save_pretrained(model, folder, *, safe, shard=None):
    """``save_pretrained`` in either serialization, sharded when ``shard`` is a size.

    transformers 5 writes only safetensors; the ``pytorch_model*.bin`` layout (and index) comes
    from huggingface_hub's ``save_torch_state_dict``, which transformers 4's
    ``save_pretrained(safe_serialization=False)`` used. Tied weights stay tied in .bin files
    (two names over one storage).
    """
    import huggingface_hub

    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kw)
    if not safe:
        for name in os.listdir(folder):
            if ".safetensors" in name:
                os.remove(os.path.join(folder, name))
        huggingface_hub.save_torch_state_dict(
            model.state_dict(), folder, safe_serialization=False, max_shard_size=shard or "5GB"
        )


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_save_pretrained_folders_read_back_exactly(tmp_path, safe, shard):
    model = _tiny_gpt2(0)
    save_pretrained(model, tmp_path, safe=safe, shard=shard)
    assert detect(tmp_path) == "huggingface"
    fmt, files = find_weights(str(tmp_path))
    assert fmt == ("safetensors" if safe else "torch")
    if shard and not safe:
        assert len(files) > 1
    sd = model.state_dict()
    with open_checkpoint(tmp_path) as ck:
        names = ck.keys()
        # transformers drops the tied lm_head.weight; everything it saved is read exactly.
        assert set(names) <= set(sd) and "transformer.wte.weight" in names
        for name in names:
            assert ck.read_tensor(name).tobytes() == torch_to_numpy(sd[name]).tobytes(), name
    assert "config.json" in model_files(tmp_path)


def test_trainer_checkpoint_folder_copies_model_files_only(tmp_path):
    model = _tiny_gpt2(1)
    ck = tmp_path / "checkpoint-100"
    model.save_pretrained(ck)
    model.generation_config.save_pretrained(ck)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_1.pth"):
        torch.save({"x": torch.ones(1)}, ck / name)
    (ck / "trainer_state.json").write_text("{}")
    (ck / "training_args.bin").write_bytes(b"\x80\x04N.")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ck / name).write_text("{}")
    (ck / "chat_template.jinja").write_text("{{ messages }}")
    assert model_files(ck) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    with open_checkpoint(ck) as reader:  # optimizer.pt and friends are never opened
        assert "transformer.h.0.attn.c_attn.weight" in reader.keys()


def test_config_differences_ignore_bookkeeping(tmp_path):
    folders = []
    for i, n_layer in enumerate((2, 2, 3)):
        m = _tiny_gpt2(i)
        d = tmp_path / f"m{i}"
        m.save_pretrained(d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["n_layer"] = n_layer
        cfg["_name_or_path"] = f"run/checkpoint-{i}"
        cfg["transformers_version"] = f"4.{i}.0"
        (d / "config.json").write_text(json.dumps(cfg))
        folders.append(str(d))
    assert config_differences(folders[:2]) == {}
    assert config_differences(folders) == {"n_layer": [2, 2, 3]}
    assert os.path.isfile(os.path.join(folders[0], "config.json"))
