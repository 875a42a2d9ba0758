"""What a merge will do (``MergePlan``) and what it did (``MergeReport``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from polyak.utils import format_bytes

__all__ = ["MergeReport", "MergePlan", "current_rss"]


@dataclass(frozen=True)
class MergeReport:
    """What a merge did.

    Attributes:
        output: the output path.
        files: the files written (the shards and index for a directory).
        tensors: number of tensors written.
        bytes_read: input bytes read (shared by all outputs of one ``merge_many`` pass).
        bytes_written: bytes written to this output.
        seconds: wall time of the whole pass, fsync included.
        weights: the weights applied, oldest input first.
        schedule: a description of the schedule.
        threads: worker threads used (see :attr:`MergePlan.threads`).
        copied: files copied into a folder output besides the weights, relative to it
            (a model's config and tokenizer files, by :func:`polyak.merge`).
        nonfinite: NaN and infinite elements met in the float tensors of the inputs read
            (propagated into the average, not repaired; 0 normally). Shared by all outputs
            of one ``merge_many`` pass.
        scales: names of power-of-two scale tensors (``F8_E8M0``), which have no meaningful
            average and follow ``int_policy`` like integer tensors.
    """

    output: str
    files: tuple[str, ...]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    weights: tuple[float, ...]
    schedule: str
    threads: int
    copied: tuple[str, ...] = ()
    nonfinite: int = 0
    scales: tuple[str, ...] = ()

    @property
    def read_gb_per_s(self) -> float:
        """Input bytes per second, in GB/s (10**9)."""
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9

    def _speed(self) -> str:
        """`` (1.5 GiB/s)`` when enough was read for a speed to mean something (at least
        64 MiB and 10 ms: a tiny merge's time is Python's start-up, not reading), else ``""``."""
        if self.bytes_read < 64 * 2**20 or self.seconds < 0.01:
            return ""
        return f" ({format_bytes(self.bytes_read / self.seconds)}/s)"

    def __str__(self) -> str:
        return (
            f"merged {self.tensors} tensors into {self.output}: "
            f"read {format_bytes(self.bytes_read)}, "
            f"wrote {format_bytes(self.bytes_written)} in {self.seconds:.2f} s{self._speed()} "
            f"with weights "
            f"[{', '.join(f'{w:.4g}' for w in self.weights)}]"
            + (f"; copied {', '.join(self.copied)}" if self.copied else "")
            + (
                f"; {len(self.scales)} F8_E8M0 scale tensors followed int_policy"
                if self.scales
                else ""
            )
        )


@dataclass(frozen=True)
class MergePlan:
    """What a merge will do, checked without writing anything (``polyak merge --dry-run``).

    Attributes:
        inputs: the input paths, oldest first.
        outputs: the output paths.
        tensors: (name, input dtype, output dtype, shape) per tensor.
        weights: one weight vector per output.
        bytes_to_read: input bytes the merge reads (inputs with weight 0 everywhere are skipped).
        bytes_to_write: bytes written per output (headers, metadata and index included).
        buffer_bytes: buffer memory of all threads together, from the sizing the run uses.
        threads: worker threads the run will use (chosen from the work: one for checkpoints
            of many tiny tensors; at most the ``threads`` asked for).
        warnings: e.g. the natural-order warning.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tensors: tuple[tuple[str, str, str, tuple[int, ...]], ...]
    weights: tuple[tuple[float, ...], ...]
    bytes_to_read: int
    bytes_to_write: tuple[int, ...]
    buffer_bytes: int
    threads: int
    warnings: tuple[str, ...] = field(default=())

    def peak_memory_estimate(self, baseline: int | None = None) -> int:
        """Peak resident bytes: the interpreter's current RSS (or ``baseline``) plus buffers."""
        if baseline is None:
            baseline = current_rss()
        return baseline + self.buffer_bytes + (2 << 20) * self.threads


def current_rss() -> int:
    """This process's resident memory in bytes (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
