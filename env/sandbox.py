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


@dataclass
class SandboxRequest:
    command: str  # shell command line, run by /bin/sh -c in `workdir`
    workdir: Path  # the materialised candidate; the only writable place besides scratch
    log_path: Path  # stdout and stderr, interleaved, go here
    env: dict[str, str] = field(default_factory=dict)  # added to the sandbox's allow-listed environment
    limits: Limits = field(default_factory=Limits)
    data: Path | None = None  # mounted read-only; the command sees it at the same path
    cache_dir: Path | None = None  # persistent compile caches (inductor, Triton) for this worker


@dataclass
class SandboxOutcome:
    exit_code: int | None  # None when killed
    killed: str | None = None  # "timeout" | "memory" | "cancelled" | "stopped" (by on_line)
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    detail: str = ""  # e.g. the limit that was hit


# Called with each output line; returning True stops the run (early stopping).
LineCallback = Callable[[str], bool | None]


class Sandbox(Protocol):
    name: str

    def run(self, request: SandboxRequest, on_line: LineCallback | None = None,
            cancel: threading.Event | None = None) -> SandboxOutcome: ...
