"""Build tinylm-bpb's data: a fixed budget of training bytes, a held-out code split and a held-out
prose split, all from text already on this machine (no download).

Two kinds of document:
- code: the Python standard library's .py files (tinygpt's corpus, split by a hash of the path);
- prose: the reference manual's topics that ship with Python (pydoc_data.topics), split by a hash
  of the topic's name.

    python prepare.py --out DIR

    DIR/run/train_code.bin     CODE_TOKENS bytes of code      } the data budget: all a run sees
    DIR/run/train_text.bin     TEXT_TOKENS bytes of prose     } (its `{data}`), exactly these tokens
    DIR/heldout/val_000.bin    held-out code: the objective's bits per byte (trusted evaluator only)
    DIR/guard/text_000.bin     held-out prose: the guard's next-byte accuracy (trusted evaluator only)

The budget is what is mounted: the run never gets a byte more. Each document starts with a 0 byte.
Shards in the NanoGPT speedrun's format (256 int32 header: magic 20240520, version 1, token
count; then uint16 tokens). Idempotent and atomic, as tinygpt's prepare.py. Self-contained: it
runs in the target's shipped folder on each node, where the speedsearch package may not be importable.
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
MARKER = "DONE"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}

CODE_TOKENS = 2**16  # the data budget, per kind: 128 Ki tokens in all
TEXT_TOKENS = 2**16
HELDOUT_TOKENS = 2**16
HELDOUT_PERCENT = 10  # documents whose hash % 100 is below this are held out


def documents(root: Path) -> list[tuple[str, bytes]]:
    """(relative path, bytes) of every .py file under root (generated tables and installed packages left out)."""
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(".py") and (data := path.read_bytes()).strip():
                docs.append((path.relative_to(root).as_posix(), data))
    return sorted(docs)


def tokens(docs: list[bytes]) -> np.ndarray:
    """Bytes as tokens (vocab 256), a 0 byte before each document."""
    return np.frombuffer(b"".join(b"\0" + d for d in docs), dtype=np.uint8).astype(np.uint16)


def write_shard(path: Path, toks: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(toks)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype("<u2").tobytes())


def _hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"tinylm-bpb:{name}".encode()).digest()[:8], "big")


def _split(docs: list[tuple[str, bytes]]) -> tuple[list[bytes], list[bytes]]:
    """(training documents, held-out documents), each in hash order (a deterministic shuffle)."""
    train, held = [], []
    for name, data in sorted(docs, key=lambda d: _hash(d[0])):
        (held if _hash(name) % 100 < HELDOUT_PERCENT else train).append(data)
    return train, held


def _exact(docs: list[bytes], n: int, what: str):
    toks = tokens(docs)
    if len(toks) < n:
        raise SystemExit(f"prepare: only {len(toks)} {what} tokens on this machine, the budget needs {n}")
    return toks[:n]


def prose() -> list[tuple[str, bytes]]:
    from pydoc_data.topics import topics

    return [(name, text.encode()) for name, text in sorted(topics.items()) if text.strip()]


def build(out: Path, source: Path) -> dict:
    code_train, code_held = _split(documents(source))
    text_train, text_held = _split(prose())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # readable by the sandboxed runs that mount run/
    try:
        (tmp / "run").mkdir(mode=0o755)
        for name in ("heldout", "guard"):
            (tmp / name).mkdir(mode=0o700)  # the host's evaluator reads them; a run (another uid) cannot
        write_shard(tmp / "run" / "train_code.bin", _exact(code_train, CODE_TOKENS, "code"))
        write_shard(tmp / "run" / "train_text.bin", _exact(text_train, TEXT_TOKENS, "prose"))
        write_shard(tmp / "heldout" / "val_000.bin", _exact(code_held, HELDOUT_TOKENS, "held-out code"))
        guard = tokens(text_held)
        write_shard(tmp / "guard" / "text_000.bin", guard[:HELDOUT_TOKENS])
        info = {"source": "python stdlib .py files and pydoc_data.topics", "python": sys.version.split()[0],
                "train_tokens": CODE_TOKENS + TEXT_TOKENS, "heldout_tokens": HELDOUT_TOKENS,
                "guard_tokens": int(min(len(guard), HELDOUT_TOKENS)), "guard_topics": len(text_held)}
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if (out / MARKER).exists():  # another process finished first
            return info
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--source", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="folder of .py files (default: this Python's standard library)")
    args = parser.parse_args()
    if (args.out / MARKER).exists():
        print(f"prepare: {args.out} is complete; nothing to do")
        return
    info = build(args.out.resolve(), args.source)
    print(f"prepare: wrote {info['train_tokens']} training, {info['heldout_tokens']} held-out code and "
          f"{info['guard_tokens']} held-out prose tokens to {args.out}")


if __name__ == "__main__":
    main()
