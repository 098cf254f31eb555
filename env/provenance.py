"""Where and how a run ran, so timings are only ever compared within one machine."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import socket
import subprocess


@functools.cache
def _machine() -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}
    try:  # read from the package metadata: importing torch here would cost seconds per controller
        info["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        info["torch"] = ""
    local = info["torch"].partition("+")[2]
    info["cuda"] = f"{local[2:-1]}.{local[-1]}" if local.startswith("cu") and len(local) > 3 else ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["gpus_on_host"] = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        info["gpus_on_host"] = []
    return info


def provenance(gpu_ids: tuple[str, ...] = ()) -> dict:
    info = dict(_machine())
    info["gpu_ids"] = list(gpu_ids)
    names = [g.split(",")[1].strip() for g in info["gpus_on_host"] if g.split(",")[0].strip() in gpu_ids]
    info["gpu_model"] = names[0] if names else ""
    return info
