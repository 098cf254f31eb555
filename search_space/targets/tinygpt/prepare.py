"""Build tinygpt's corpus from text already on this machine: the Python standard library's sources.

Each .py file is one document; documents are split into train, dev and held-out by a hash of
their path (so no file is in two), shuffled by the same hash, and written as bytes (vocab 256, a 0
byte before each document) in the NanoGPT speedrun's shard format: a header of 256 int32 (magic
20240520, version 1, token count, zeros), then the tokens as uint16.

    python prepare.py --out DIR

    DIR/run/train_*.bin       what a training run sees (its `{data}`)
    DIR/run/val_000.bin       the dev split: the trainer's own validation curve
    DIR/heldout/val_000.bin   the real validation split: only the trusted evaluator reads it

Idempotent: a DIR that holds a complete set (the DONE marker) is left as it is. Atomic: the shards
are written into a temporary folder beside DIR that is renamed into place when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
MAX_TRAIN_TOKENS = 24 * 2**20  # caps keep the build to a few seconds
MAX_VAL_TOKENS = 2**20
SHARD_TOKENS = 8 * 2**20
HELDOUT_PERCENT = 6  # hash % 100 below this: held-out (the same files as data version 1's val)
DEV_PERCENT = 6  # the next 6: dev
SEPARATOR = 0  # byte that starts each document; it does not occur in Python source
MARKER = "DONE"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__",
             "encodings", "pydoc_data"}  # generated tables and a docs dump: near-duplicates, not code


def documents(root: Path) -> list[tuple[str, bytes]]:
    """(relative path, bytes) for every .py file under root, in sorted path order."""
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                if data.strip():
                    docs.append((path.relative_to(root).as_posix(), data))
    docs.sort()
    return docs


def doc_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")


def split(docs: list[tuple[str, bytes]]) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Train, dev and held-out documents, each in hash order (a deterministic shuffle), capped in size."""
    train, dev, heldout = [], [], []
    for rel, data in sorted(docs, key=lambda d: doc_hash(d[0])):
        h = doc_hash(rel) % 100
        (heldout if h < HELDOUT_PERCENT else dev if h < HELDOUT_PERCENT + DEV_PERCENT else train).append(data)
    return _cap(train, MAX_TRAIN_TOKENS), _cap(dev, MAX_VAL_TOKENS), _cap(heldout, MAX_VAL_TOKENS)


def _cap(docs: list[bytes], limit: int) -> list[bytes]:
    out, total = [], 0
    for data in docs:
        if total + len(data) + 1 > limit:
            break
        out.append(data)
        total += len(data) + 1
    return out


def tokens(docs: list[bytes]) -> np.ndarray:
    stream = b"".join(bytes([SEPARATOR]) + d for d in docs)
    return np.frombuffer(stream, dtype=np.uint8).astype(np.uint16)


def write_shard(path: Path, toks: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(toks)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype("<u2").tobytes())


def build(out: Path, source: Path) -> dict:
    docs = documents(source)
    if not docs:
        raise SystemExit(f"prepare: no .py files under {source}")
    train, dev, heldout = split(docs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # readable by the sandboxed runs that mount run/
    try:
        (tmp / "run").mkdir(mode=0o755)
        (tmp / "heldout").mkdir(mode=0o700)  # the host's evaluator reads it; a run (another uid) cannot
        train_toks = tokens(train)
        for i, start in enumerate(range(0, len(train_toks), SHARD_TOKENS)):
            write_shard(tmp / "run" / f"train_{i:03d}.bin", train_toks[start:start + SHARD_TOKENS])
        write_shard(tmp / "run" / "val_000.bin", tokens(dev))
        write_shard(tmp / "heldout" / "val_000.bin", tokens(heldout))
        info = {
            "source": "python stdlib .py files", "python": sys.version.split()[0], "files": len(docs),
            "train_docs": len(train), "dev_docs": len(dev), "heldout_docs": len(heldout),
            "train_tokens": len(train_toks), "dev_tokens": int(sum(len(d) + 1 for d in dev)),
            "heldout_tokens": int(sum(len(d) + 1 for d in heldout)),
        }
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the shards")
    parser.add_argument("--source", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="folder of .py files (default: this Python's standard library)")
    args = parser.parse_args()
    if (args.out / MARKER).exists():
        print(f"prepare: {args.out} is complete; nothing to do")
        return
    info = build(args.out.resolve(), args.source)
    print(f"prepare: wrote {info['train_tokens']} train, {info['dev_tokens']} dev and {info['heldout_tokens']} "
          f"held-out tokens ({info['train_docs']}+{info['dev_docs']}+{info['heldout_docs']} files) to {args.out}")


if __name__ == "__main__":
    main()
