"""Shared pieces of the benchmark scripts: one method per subprocess, peak RSS from outside.

Every measurement runs in a fresh interpreter so that one method's memory cannot hide in
another's: the parent starts the child and reaps it with ``os.wait4``, which hands back the
kernel's resource usage of that one child, including its peak resident set ``ru_maxrss``
(the number ``/usr/bin/time -v`` prints). The child prints its result as one JSON line, the
last line of its stdout.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """The environment of a child: this checkout's polyak first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    return env


# A child spawned straight from the benchmark driver would inherit the driver's peak RSS:
# on exec, Linux folds the old address space's high-water mark into the new process's
# ru_maxrss, and with vfork (what subprocess uses) that old address space is the driver's.
# So a bare interpreter (``python -S``, about 9 MiB) spawns the method and reaps it with
# wait4: the method's ru_maxrss is then its own peak (floored at the launcher's few MiB).
_LAUNCHER = """
import os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(args: list[str], *, timeout: float = 900.0) -> dict[str, Any]:
    """Run ``python *args``; return its JSON result plus ``peak_rss_mib`` seen from outside.

    Raises:
        RuntimeError: the child failed, ran past ``timeout`` or printed no JSON line (the
            end of its stderr is included).
    """
    import subprocess

    cmd = [sys.executable, *args]
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r") as rss,
    ):
        proc = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, rss.name, *cmd],
            stdout=out,
            stderr=err,
            env=child_env(),
            timeout=timeout,
            check=False,
        )
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        peak_kib = rss.read().strip()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{stderr[-3000:]}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed no JSON line:\n{stdout[-2000:]}{stderr}")
    result = json.loads(lines[-1])
    result["peak_rss_mib"] = int(peak_kib) / 1024  # Linux reports KiB
    return result


def current_rss_mib() -> float:
    """This process's resident set now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def available_memory_bytes() -> int:
    """Memory the kernel says a new process could use without swapping (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model, Python and library versions, for the results file."""
    import platform

    import numpy as np

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("safetensors", "torch", "ml_dtypes"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(total / 2**30, 1),
        "cpu": cpu,
        "os": platform.platform(),
        **versions,
    }
