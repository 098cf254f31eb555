"""The built-in targets shipped inside the package."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
# name -> target file, relative to this folder
BUILTINS = {
    "tinygpt": "tinygpt/target.toml",
    "tinygpt-gpu": "tinygpt/target-gpu.toml",
    "tinygpt-ddp": "tinygpt/target-ddp.toml",
    "tinylm-epochs": "epochs/target.toml",
    "tinylm-bpb": "slowrun/target.toml",
}


def builtin_path(name: str) -> Path | None:
    rel = BUILTINS.get(name)
    return HERE / rel if rel else None
