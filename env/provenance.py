"""Where and how a run ran, so timings are only ever compared within one machine.

Recorded per run: the host and its Ray node, the GPU model, torch and its CUDA version, this
node's speedsearch version, and the code version of the controller that asked for the run (a
node with another install is then visible in the record).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path


def _torch_version_py() -> dict[str, str]:
    """`__version__` and `cuda` as torch/version.py writes them, read as text: importing torch would
    cost seconds on a controller. The package metadata will not do: the wheels of the default index
    carry no local tag there (2.11.0, where torch says 2.11.0+cu130; seen on the H100)."""
    try:
        spec = importlib.util.find_spec("torch")  # finds, does not import, a top-level package
    except (ImportError, ValueError):
        return {}
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(folder) / "version.py").read_text()
        except OSError:
            continue
        return {name: m.group(1) for name in ("__version__", "cuda")
                if (m := re.search(rf"^{name}\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M))}
    return {}


def torch_cuda() -> str:
    """The CUDA version torch was built with ("" for a CPU build or no torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and getattr(getattr(torch, "version", None), "cuda", None):
        return str(torch.version.cuda)  # already imported (a run's own process): the answer itself
    return _torch_version_py().get("cuda", "")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


@functools.cache
def code_version() -> str:
    """This install of speedsearch: its package version, and the git commit of the checkout it runs
    from when it is one (an editable install), `+dirty` when that has uncommitted changes."""
    version = _version("speedsearch") or "unknown"
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0 or not (here / ".git").exists():
            return version
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{version}+g{head.stdout.strip()}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.TimeoutExpired):
        return version


@functools.cache
def machine() -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}
    info["torch"] = _torch_version_py().get("__version__") or _version("torch")
    local = info["torch"].partition("+")[2]
    tagged = f"{local[2:-1]}.{local[-1]}" if local.startswith("cu") and len(local) > 3 else ""
    info["cuda"] = torch_cuda() or tagged
    info["speedsearch"] = code_version()  # this node's install
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["gpus_on_host"] = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        info["gpus_on_host"] = []
    return info


_machine = machine  # the old private name


def ray_node() -> str:
    """The Ray node this process runs on ("" outside Ray). Ray is never imported for it."""
    ray = sys.modules.get("ray")
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
    except Exception:  # a runtime context being torn down: the node is unknown, the run is not at fault
        return ""


def provenance(gpu_ids: tuple[str, ...] = (), controller_code: str = "") -> dict:
    """`controller_code`: the code version of the controller that asked for the run (empty when the
    run is this process's own, e.g. `evaluate` without Ray)."""
    info = dict(machine())
    info["node_id"] = ray_node()
    info["code_version"] = controller_code or info["speedsearch"]
    info["gpu_ids"] = list(gpu_ids)
    names = [g.split(",")[1].strip() for g in info["gpus_on_host"] if g.split(",")[0].strip() in gpu_ids]
    info["gpu_model"] = names[0] if names else ""
    return info
