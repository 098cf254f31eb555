"""What the machine that runs a run has, and the memory a run gets when its target names none.

The default follows the machine instead of a fixed number: a fixed 4 GB was half of what a record
speedrun needs on an H100 host with 128 GB, and more than a small CPU box can give each of its runs.
It is computed where the run executes (a pool worker's node), not on the controller.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

SHARE = 0.8  # of the machine's memory, for all its runs together; the rest for the OS, Ray, page cache
FLOOR_MB = 512


def total_memory_mb() -> int:
    """Physical memory, or the memory limit of the cgroup this process lives in when that is lower
    (a container sees the host's /proc/meminfo, not its own limit)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return total >> 20


@functools.cache
def gpu_count() -> int:
    """Every GPU of the machine, whatever CUDA_VISIBLE_DEVICES says (a Ray task sees only its own)."""
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def runs_that_fit(gpus: int, cpus: int) -> int:
    """How many runs needing `gpus` GPUs and `cpus` cores this machine holds at once (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    fit = cores // max(1, cpus)
    if gpus > 0:
        fit = min(fit, gpu_count() // gpus)
    return max(1, fit)


def default_memory_mb(gpus: int, cpus: int) -> int:
    """A run's share: SHARE of the machine's memory divided by the runs that fit beside it."""
    return max(FLOOR_MB, int(SHARE * total_memory_mb() / runs_that_fit(gpus, cpus)))


def run_memory_mb(memory_mb: int | None, gpus: int, cpus: int) -> int:
    """The target's `resources.memory_mb` where it sets one, else the machine's default."""
    return memory_mb if memory_mb is not None else default_memory_mb(gpus, cpus)
