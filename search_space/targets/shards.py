"""The built-in targets' data folders: shards in the NanoGPT speedrun's format, published whole.

A shard is a header of 256 int32 (magic 20240520, version 1, token count, zeros), then the tokens
as uint16. A data folder is written into a temporary folder beside its place and renamed into it
when complete, with a DONE file that records what it holds: a folder that exists is complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
MARKER = "DONE"


def write_shard(path: Path, toks: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(toks)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype("<u2").tobytes())


def publish(out: Path, private: tuple[str, ...], fill: Callable[[Path], dict]) -> dict:
    """Make `out`: `fill(folder)` writes the shards (`run/` exists, readable by the sandboxed runs
    that mount it; each name in `private` exists, readable only by this uid: the host's evaluator)
    and returns what the DONE file records. Idempotent and safe against a concurrent publisher."""
    if (out / MARKER).exists():
        return json.loads((out / MARKER).read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "run").mkdir(mode=0o755)
        for name in private:
            (tmp / name).mkdir(mode=0o700)  # a run (another uid, and hidden by the sandbox) cannot read it
        info = fill(tmp)
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if (out / MARKER).exists():  # another process finished first
            return info
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info
