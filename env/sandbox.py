"""Sandboxes run one command with limits and a hard kill. This module holds the shared interface."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Limits:
    """What one run may use; a sandbox enforces every field."""

    timeout_s: float = 600.0
    memory_mb: int = 4096
    cpus: int = 1
    gpu_ids: tuple[str, ...] = ()  # physical ids to expose (CUDA_VISIBLE_DEVICES inside)
    pids: int = 512  # processes and threads at once (a fork bomb stops here)
    log_mb: int = 64  # stdout+stderr bytes kept; past it the run is stopped (killed="log")
    disk_mb: int = 4096  # the workspace's size; past it the run is stopped (killed="disk"); 0 = no cap


@dataclass
class SandboxRequest:
    command: str  # shell command line, run by /bin/sh -c in `workdir`
    workdir: Path  # the materialised candidate; the only writable place besides scratch
    log_path: Path  # stdout and stderr, interleaved, go here
    env: dict[str, str] = field(default_factory=dict)  # added to the sandbox's allow-listed environment
    limits: Limits = field(default_factory=Limits)
    data: Path | None = None  # mounted read-only; the command sees it at the same path
    cache_dir: Path | None = None  # persistent compile caches (inductor, Triton): env/cache_layer.py
    cache_write: bool = True  # False: the run reads cache_dir through an overlay of its own, never writes it
    hide: tuple[Path, ...] = ()  # paths the run must not see (e.g. a held-out split beside `data`)
    # A training run a sandbox may start from a warm slot (env/warm.py), and keep one ready for the next.
    warm: bool = False
    warm_imports: tuple[str, ...] = ()  # modules the warm slot imports before it waits (e.g. torch)


@dataclass
class SandboxOutcome:
    exit_code: int | None  # None when killed
    # "timeout" | "memory" | "cancelled" | "stopped" (by on_line) | "log" (over log_mb) | "disk" (over disk_mb)
    killed: str | None = None
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    # CPU seconds the run's processes used, counted by the kernel in its cgroup (None where unknown):
    # work no log line can hide, such as training before step 0
    cpu_s: float | None = None
    # time.monotonic() when the run's command began, its sandbox built (a volume made, a container
    # started): the start-up allowance counts from here, not from the sandbox's own set-up
    began: float | None = None
    detail: str = ""  # e.g. the limit that was hit
    # What contained the run, for the provenance: {"cgroup": ..., "namespaces": ..., "disk": ...};
    # a value starting with "none (" says what was missing and why.
    containment: dict[str, str] = field(default_factory=dict)


# Called with each output line; returning True stops the run (early stopping).
LineCallback = Callable[[str], bool | None]


class Sandbox(Protocol):
    name: str

    def run(self, request: SandboxRequest, on_line: LineCallback | None = None,
            cancel: threading.Event | None = None) -> SandboxOutcome: ...

    def release(self, workdir: Path, keep: bool = False) -> None:
        """The caller is done with `workdir`: unmount its size-capped volume (keeping the files on the
        host's disk when `keep`). `run` leaves it mounted so the run's outputs (checkpoints) can be read
        and a second command (a trusted evaluator) can run in it. Idempotent; a no-op for unknown dirs."""
