"""The compile cache a run sees: one shared folder per machine kind, that only the base fills.

Compiling a record-size trainer takes minutes; inductor's and Triton's caches cut that to a
fraction, so they are kept between runs, searches and `evaluate` calls, in
`<cache>/compile/<gpu model>-torch<version>` (kernels built for one GPU model and torch are
useless, or wrong, for another). Which Ray node or worker ran is not in the key: it changes with
every start.

A candidate is untrusted: were it to write there, it could plant a kernel that the baseline's
runs, or the trusted evaluator's, would load. So only runs that fill the cache (the base's) get
the shared folder itself; every other run gets an overlay: the shared folder as its read-only
lower layer, its writes going to an upper layer inside the run's own workspace, gone with it.
Where no overlay can be mounted (no privilege), the run gets an empty cache of its own instead.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
from pathlib import Path

from env.namespaces import CACHE_LAYERS
from env.volume import overlay_mount
from search_space.target import cache_dir

SUBDIRS = ("inductor", "triton")


@functools.cache
def machine_kind() -> str:
    """`<gpu model>-torch<version>` of this machine ("cpu" where it has no GPU), file-name safe."""
    from env.provenance import provenance

    gpus = provenance()["gpus_on_host"]
    model = gpus[0].split(",")[1].strip() if gpus and len(gpus[0].split(",")) > 1 else "cpu"
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "none"
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", f"{model}-torch{torch}")


def shared_cache() -> Path:
    """This machine kind's shared compile cache (made if missing)."""
    path = cache_dir() / "compile" / machine_kind()
    for sub in ("", *SUBDIRS):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def mount_reader(lower: Path, scratch: Path, owner: tuple[int, int] | None) -> tuple[Path, str]:
    """The cache folder for a run that must not write `lower`: an overlay at `scratch/cache` whose
    writes land in `scratch/cache-layers/up`. Returns (folder, how): how is "overlay" or, where the mount
    is refused, "private" (an empty folder of the run's own)."""
    merged, upper, work = scratch / "cache", scratch / CACHE_LAYERS / "up", scratch / CACHE_LAYERS / "wk"
    if os.path.ismount(merged):
        return merged, "overlay"  # made already (a second start of the same run)
    for folder in (merged, upper, work):
        folder.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        os.chown(upper, *owner)  # the merged folder's root takes the upper layer's owner
    if overlay_mount(lower, upper, work, merged):
        return merged, "overlay"
    for sub in SUBDIRS:
        (merged / sub).mkdir(exist_ok=True)
        if owner is not None:
            os.chown(merged / sub, *owner)
    if owner is not None:
        os.chown(merged, *owner)
    return merged, "private"
