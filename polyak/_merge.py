"""``polyak.merge``: average checkpoints of any kind on disk into one safetensors checkpoint.

The format-neutral front door. Each input is opened by :func:`polyak.checkpoints.open_checkpoint`
(safetensors, torch zip files, Hugging Face model folders, DCP folders) and fed to the same
job and streaming core as :func:`polyak.safetensors.merge`; for model folders, the newest
input's config and tokenizer files are copied into a folder output with the weights.

Outputs are always safetensors. An output named like a torch file (``.pt``, ``.bin``...) is
refused rather than written in that format: safetensors loads everywhere torch files do
(``from_pretrained``, ``safetensors.torch.load_file``), cannot run code when loaded, and is
what polyak streams; a torch file can be made from it in two lines if one is needed.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from polyak._errors import warn_at_caller
from polyak._types import PathLike, ScheduleLike
from polyak.utils import order_inputs

if TYPE_CHECKING:  # the safetensors package loads on the first merge, not on import polyak
    from typing_extensions import Unpack

    from polyak.safetensors import CheckpointMergeSettings, MergePlan, MergeReport

__all__ = ["merge", "plan", "TORCH_SUFFIXES"]

#: Output names refused by :func:`merge`: they promise a torch file.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar", ".pkl", ".tar")


def _check_output(output: PathLike) -> str:
    from polyak.safetensors import OutputError

    out = os.fspath(output)
    name = os.path.basename(os.path.normpath(out)).lower()
    suffix = next((s for s in TORCH_SUFFIXES if name.endswith(s)), None)
    if suffix is not None:
        stem = out[: -len(suffix)] if out.lower().endswith(suffix) else out
        raise OutputError(
            f"output {out}: polyak writes safetensors only, and {suffix!r} names a torch "
            f"file; use {stem}.safetensors for one file or a folder name (e.g. {stem}/) for "
            "a Hugging Face model folder. To get a torch file anyway: "
            "torch.save(safetensors.torch.load_file(path), 'out.pt')"
        )
    return out


def _inputs_setup(
    ins: list[str], out: str, copy_files: bool
) -> tuple[list[tuple[str, str]], list[dict[str, str]] | None]:
    """The model files to copy into ``out`` and the base metadata of the output.

    Warns :class:`~polyak.checkpoints.ConfigWarning` when the inputs are model folders whose
    configs differ beyond bookkeeping fields.
    """
    from polyak import checkpoints as pc

    kinds = [pc.detect(p) for p in ins]
    extra: list[tuple[str, str]] = []
    if all(k == "huggingface" for k in kinds):
        diffs = pc.config_differences(ins)
        if diffs:
            shown = "; ".join(f"{k}: {v!r:.120}" for k, v in list(diffs.items())[:8])
            more = f" (and {len(diffs) - 8} more fields)" if len(diffs) > 8 else ""
            warn_at_caller(
                f"the inputs' config.json files differ: {shown}{more}; the config of the "
                f"newest input ({ins[-1]}) is the one copied",
                pc.ConfigWarning,
            )
        if copy_files and not out.endswith(".safetensors"):
            newest = ins[-1]
            extra = [(os.path.join(newest, rel), rel) for rel in pc.model_files(newest)]
    # Torch and DCP inputs carry no safetensors metadata; transformers wants the "format"
    # entry that its own safetensors files have.
    safetensors_weights = [
        k == "safetensors" or (k == "huggingface" and pc.find_weights(p)[0] == "safetensors")
        for k, p in zip(kinds, ins)
    ]
    metadata = None if safetensors_weights[0] else [{"format": "pt"}]
    return extra, metadata


def _prepare(
    caller: str, inputs: Sequence[PathLike], output: PathLike, settings: dict[str, Any]
) -> tuple[list[str], str, Any, dict[str, Any]]:
    """Inputs and output checked, the options, and :class:`MergeJob`'s keywords."""
    from polyak.checkpoints import open_checkpoint
    from polyak.safetensors import CheckpointMergeSettings
    from polyak.safetensors._job import check_paths
    from polyak.safetensors._options import MergeOptions

    options = MergeOptions.parse(caller, settings, CheckpointMergeSettings)
    if options.sort is not None:  # None: the job's order check warns (or the plan lists it)
        inputs = order_inputs(inputs, options.sort)
    out = _check_output(output)
    ins, _ = check_paths(inputs, [out], 1)
    copy_files = settings.get("copy_files", True)
    extra, metadata = _inputs_setup(ins, out, copy_files)
    job_args = {
        "opener": functools.partial(open_checkpoint, key=settings.get("key")),
        "extra_files": extra,
        "metadata": metadata,
    }
    return ins, out, options, job_args


def merge(
    inputs: Sequence[PathLike],
    output: PathLike,
    schedule: ScheduleLike = None,
    **settings: Unpack[CheckpointMergeSettings],
) -> MergeReport:
    """Average checkpoints of any kind on disk into one safetensors checkpoint.

    Inputs may be safetensors files or sharded folders, ``torch.save`` zip files (``.pt``,
    ``.pth``, ``.bin``, ``.ckpt``, ``.pth.tar``), Hugging Face model folders (``save_pretrained``
    output or Trainer ``checkpoint-N/`` folders, weights in safetensors or ``.bin``) and
    ``torch.distributed.checkpoint`` folders, each detected from its content
    (:func:`polyak.checkpoints.detect`). They are streamed tensor by tensor as
    :func:`polyak.safetensors.merge` does, in bounded memory, and the result equals
    :func:`polyak.average` of the loaded inputs bit for bit. Torch pickles are read with a
    restricted unpickler: nothing in them runs.

    When every input is a model folder and ``output`` is a folder, the newest input's
    config, generation config, tokenizer, chat template and processor files are written
    into it with the weights (atomically: a failed merge leaves none of them), so that
    ``from_pretrained(output)`` works. Training state (optimizer, scheduler, RNG state,
    ``trainer_state.json``, ``training_args.bin``) is never copied.

    Args:
        inputs: checkpoint paths in chronological order (oldest first).
        output: ``*.safetensors`` for one file; anything else is a folder (a sharded
            checkpoint, or a model folder). Names of torch files are refused.
        schedule: as in :func:`polyak.average` (None = equal weights, ``"linear"``...).
        **settings: keyword settings (:class:`polyak.safetensors.CheckpointMergeSettings`):
            those of :func:`polyak.safetensors.merge` (``normalize``, ``dtype``,
            ``int_policy``, ``accumulate_dtype``, ``threads``, ``max_shard_size``,
            ``chunk_elements``, ``sort``, ``progress``, ``force``), and:

            - ``key``: where the weights sit in a nested torch or DCP checkpoint:
              ``"state_dict"`` (Lightning), ``"model"``, ``"state_dict_ema"``, dotted for
              deeper nesting.
            - ``copy_files``: copy the newest model folder's non-weight model files (see
              above; default True).

    Returns:
        A :class:`polyak.safetensors.MergeReport`; ``copied`` lists the copied files.

    Raises:
        OutputError: ``output`` names a torch file (the message says what to use), or is
            one of the inputs.
        KeyChoiceError: a nested checkpoint and no (or a wrong) ``key``; the message lists
            the keys that hold tensor mappings. Nothing is written.
        UnsafeCheckpointError: a torch pickle references anything outside the tensor
            allow-list.
        CheckpointError, StructureError, WeightsError, DtypeError: as
            :func:`polyak.safetensors.merge`.
        OutputWriteError: the disk is full or a size limit is hit; nothing is left behind.

    Warns:
        ConfigWarning: model folders whose ``config.json`` differ beyond bookkeeping fields.
        OrderWarning: numbered inputs out of natural order (without ``sort``).

    Example:
        >>> import os, tempfile, torch, polyak
        >>> d = tempfile.mkdtemp()
        >>> paths = [os.path.join(d, f"epoch{i}.ckpt") for i in range(3)]
        >>> for i, p in enumerate(paths):
        ...     torch.save({"state_dict": {"w": torch.full((2,), float(i))}, "epoch": i}, p)
        >>> report = polyak.merge(paths, os.path.join(d, "avg.safetensors"), key="state_dict")
        >>> polyak.safetensors.load(os.path.join(d, "avg.safetensors"))["w"]
        array([1., 1.], dtype=float32)
    """
    from polyak.safetensors._merge import run_merge

    ins, out, options, job_args = _prepare("merge", inputs, output, dict(settings))
    (report,) = run_merge(ins, [out], [schedule], options, **job_args)
    return report


def plan(
    inputs: Sequence[PathLike],
    output: PathLike,
    schedule: ScheduleLike = None,
    **settings: Unpack[CheckpointMergeSettings],
) -> tuple[MergePlan, list[str]]:
    """What :func:`merge` would do, checked without writing: the
    :class:`polyak.safetensors.MergePlan` and the files it would copy (``polyak merge
    --dry-run``), refusing an output as :func:`merge` would. ``settings`` are the keywords of
    :func:`merge`; ``progress`` is ignored, since no tensor data is read."""
    from polyak.safetensors._job import MergeJob
    from polyak.safetensors._merge import describe

    ins, out, options, job_args = _prepare("plan", inputs, output, dict(settings))
    with contextlib.ExitStack() as stack:
        job = MergeJob(stack, ins, [out], [schedule], options, **job_args)
        return describe(job), job.copied(0)
