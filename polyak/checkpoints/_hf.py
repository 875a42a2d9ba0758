"""Hugging Face model folders: where the weights are, which other files a model needs.

A folder from ``save_pretrained`` (or a Trainer ``checkpoint-N/``) holds the weights as
``model.safetensors``, a sharded safetensors index, ``pytorch_model.bin`` or a sharded ``.bin``
index, next to the files ``from_pretrained`` reads (config, generation config, tokenizer,
processor) and, in Trainer folders, training state that is never weights and never copied.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any

from polyak.checkpoints._errors import CheckpointError

__all__ = [
    "WEIGHT_FILES",
    "TRAINING_STATE",
    "MODEL_FILE_PATTERNS",
    "BOOKKEEPING_FIELDS",
    "find_weights",
    "model_files",
    "config_differences",
]

# In the order transformers prefers them.
WEIGHT_FILES = (
    ("safetensors", "model.safetensors.index.json"),
    ("safetensors", "model.safetensors"),
    ("torch", "pytorch_model.bin.index.json"),
    ("torch", "pytorch_model.bin"),
)

# Trainer state next to the weights: never read, never copied.
TRAINING_STATE = (
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "training_args.bin",
)

# Files from_pretrained reads besides the weights (config, tokenizer, processor, custom code).
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "feature_extractor_config.json",
    "image_processor_config.json",
    "configuration_*.py",
    "modeling_*.py",
    "tokenization_*.py",
    "processing_*.py",
    "image_processing_*.py",
)

# config.json fields that say how a file was written, not what the model is.
BOOKKEEPING_FIELDS = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}
)


def find_weights(folder: str) -> tuple[str, list[str]]:
    """The format and files of a model folder's weights: ``("safetensors", [file or index])``
    or ``("torch", [files])``.

    Raises:
        CheckpointError: the folder holds none of the known weight files.

    Example:
        >>> import os, tempfile
        >>> from polyak.checkpoints import find_weights
        >>> folder = tempfile.mkdtemp()
        >>> open(os.path.join(folder, "model.safetensors"), "wb").close()
        >>> kind, files = find_weights(folder)
        >>> kind, [os.path.basename(f) for f in files]
        ('safetensors', ['model.safetensors'])
    """
    for kind, name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if kind == "safetensors":
            return kind, [path]
        if name.endswith(".index.json"):
            return kind, _bin_shards(path)
        return kind, [path]
    raise CheckpointError(
        f"{folder}: no model weights found (expected one of "
        f"{', '.join(n for _, n in WEIGHT_FILES)})"
    )


def _bin_shards(index_path: str) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from None
    folder = os.path.dirname(index_path)
    for s in shards:
        if not isinstance(s, str) or os.path.basename(s) != s:
            raise CheckpointError(f"{index_path}: shard {s!r} is not a file name in the folder")
    return [os.path.join(folder, s) for s in shards]


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def model_files(folder: str | os.PathLike[str]) -> list[str]:
    """The non-weight files of a model folder that ``from_pretrained`` needs, sorted.

    Config, generation config, tokenizer files and special-tokens map, chat templates,
    processor configs and custom model code (see ``MODEL_FILE_PATTERNS``). Weights and
    training state (optimizer, scheduler, RNG state, ``trainer_state.json``,
    ``training_args.bin``) are never listed.

    Args:
        folder: a Hugging Face model folder.

    Returns:
        Paths relative to ``folder``.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> for n in ("config.json", "tokenizer.json", "optimizer.pt", "model.safetensors"):
        ...     open(os.path.join(d, n), "w").close()
        >>> model_files(d)
        ['config.json', 'tokenizer.json']
    """
    folder = os.fspath(folder)
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if _matches(rel, MODEL_FILE_PATTERNS) and not _matches(rel, TRAINING_STATE):
                found.append(rel)
    return sorted(found)


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read config ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: config is not a JSON object")
    return obj


def config_differences(folders: list[str]) -> dict[str, list[Any]]:
    """Fields of ``config.json`` that differ between model folders, bookkeeping ignored.

    Args:
        folders: model folders; those without a ``config.json`` are skipped.

    Returns:
        ``{field: [value in each folder with a config]}`` for every field (missing ones as
        None) whose values differ, ignoring ``BOOKKEEPING_FIELDS``; empty when they agree.

    Example:
        >>> import json, os, tempfile
        >>> ds = [tempfile.mkdtemp() for _ in range(2)]
        >>> for d, n in zip(ds, (2, 4)):
        ...     with open(os.path.join(d, "config.json"), "w") as f:
        ...         json.dump({"n_layer": n, "transformers_version": str(n)}, f)
        >>> config_differences(ds)
        {'n_layer': [2, 4]}
    """
    configs = [
        _read_config(os.path.join(f, "config.json"))
        for f in folders
        if os.path.isfile(os.path.join(f, "config.json"))
    ]
    fields = sorted({k for c in configs for k in c} - BOOKKEEPING_FIELDS)
    out = {}
    for k in fields:
        values = [c.get(k) for c in configs]
        if any(v != values[0] for v in values[1:]):
            out[k] = values
    return out
