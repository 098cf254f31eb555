"""Build tinygpt's corpus: code-like documents of the secret language (search_space/targets/language.py).

The language and its samples are drawn from the data key that speedsearch passes in
SPEEDSEARCH_DATA_KEY, so no run can rebuild any of it: train, dev and held-out are three streams
of the same language that share no document. Bytes are tokens (vocab 256, a 0 byte before each
document), in the NanoGPT speedrun's shard format (search_space/targets/shards.py).

    SPEEDSEARCH_DATA_KEY=<hex> python prepare.py --out DIR

    DIR/run/train_*.bin       what a training run sees (its `{data}`)
    DIR/run/val_000.bin       the dev split: the trainer's own validation curve
    DIR/heldout/val_000.bin   the real validation split: only the trusted evaluator reads it

Idempotent: a DIR that holds a complete set (the DONE marker) is left as it is. Atomic: the shards
are written into a temporary folder beside DIR that is renamed into place when complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from search_space.targets.language import VERSION as LANGUAGE_VERSION
from search_space.targets.language import Language, key_from_env
from search_space.targets.shards import MARKER, publish, write_shard

MAX_TRAIN_TOKENS = 24 * 2**20  # the GPU preset's 1000 steps read 32 Mi tokens at random from these
MAX_VAL_TOKENS = 2**20
SHARD_TOKENS = 8 * 2**20


def build(out: Path, key: bytes) -> dict:
    lang = Language(key)

    def fill(folder: Path) -> dict:
        train = lang.tokens("code", "train", MAX_TRAIN_TOKENS, key)
        for i, start in enumerate(range(0, len(train), SHARD_TOKENS)):
            write_shard(folder / "run" / f"train_{i:03d}.bin", train[start:start + SHARD_TOKENS])
        write_shard(folder / "run" / "val_000.bin", lang.tokens("code", "dev", MAX_VAL_TOKENS, key))
        write_shard(folder / "heldout" / "val_000.bin", lang.tokens("code", "heldout", MAX_VAL_TOKENS, key))
        return {"source": "search_space/targets/language.py, code documents", "language": LANGUAGE_VERSION,
                "train_tokens": len(train), "dev_tokens": MAX_VAL_TOKENS, "heldout_tokens": MAX_VAL_TOKENS}

    return publish(out, ("heldout",), fill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the shards")
    args = parser.parse_args()
    if (args.out / MARKER).exists():
        print(f"prepare: {args.out} is complete; nothing to do")
        return
    info = build(args.out.resolve(), key_from_env())
    print(f"prepare: wrote {info['train_tokens']} train, {info['dev_tokens']} dev and {info['heldout_tokens']} "
          f"held-out tokens to {args.out}")


if __name__ == "__main__":
    main()
