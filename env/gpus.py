"""The GPUs of this machine, for runs started without Ray (Ray assigns ids to its own tasks)."""

from __future__ import annotations

import os
import subprocess


def visible_gpus() -> list[str]:
    """The ids this process may use: CUDA_VISIBLE_DEVICES when set, else every GPU nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def local_gpu_ids(n: int) -> tuple[str, ...]:
    """The first `n` usable GPUs; ValueError when the machine has fewer."""
    if n <= 0:
        return ()
    gpus = visible_gpus()
    if len(gpus) < n:
        raise ValueError(f"the target needs {n} GPU(s); this machine shows {len(gpus)}")
    return tuple(gpus[:n])
