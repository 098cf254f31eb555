"""Build tinylm-bpb's data: a fixed budget of training bytes, a held-out code split and a held-out
prose split, all drawn from the secret language (search_space/targets/language.py) of the data key
speedsearch passes in SPEEDSEARCH_DATA_KEY. No run can rebuild any of it, so the budget is what is
mounted: a run cannot train on one byte more of the language it is measured on.

Two kinds of document share the language's alphabet and vocabulary:
- code: lines and indentation;
- prose: sentences and paragraphs (another grammar over the same words).

    SPEEDSEARCH_DATA_KEY=<hex> python prepare.py --out DIR

    DIR/run/train_code.bin     CODE_TOKENS bytes of code      } the data budget: all a run sees
    DIR/run/train_text.bin     TEXT_TOKENS bytes of prose     } (its `{data}`), exactly these tokens
    DIR/heldout/val_000.bin    held-out code: the objective's bits per byte (trusted evaluator only)
    DIR/guard/text_000.bin     held-out prose: the guard's next-byte accuracy (trusted evaluator only)

Each document starts with a 0 byte. Shards in the NanoGPT speedrun's format, the folder published
whole (search_space/targets/shards.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from search_space.targets.language import VERSION as LANGUAGE_VERSION
from search_space.targets.language import Language, key_from_env
from search_space.targets.shards import MARKER, publish, write_shard

CODE_TOKENS = 2**16  # the data budget, per kind: 128 Ki tokens in all
TEXT_TOKENS = 2**16
HELDOUT_TOKENS = 2**16


def build(out: Path, key: bytes) -> dict:
    lang = Language(key)

    def fill(folder: Path) -> dict:
        write_shard(folder / "run" / "train_code.bin", lang.tokens("code", "train", CODE_TOKENS, key))
        write_shard(folder / "run" / "train_text.bin", lang.tokens("prose", "train", TEXT_TOKENS, key))
        write_shard(folder / "heldout" / "val_000.bin", lang.tokens("code", "heldout", HELDOUT_TOKENS, key))
        write_shard(folder / "guard" / "text_000.bin", lang.tokens("prose", "guard", HELDOUT_TOKENS, key))
        return {"source": "search_space/targets/language.py", "language": LANGUAGE_VERSION,
                "train_tokens": CODE_TOKENS + TEXT_TOKENS, "heldout_tokens": HELDOUT_TOKENS,
                "guard_tokens": HELDOUT_TOKENS}

    return publish(out, ("heldout", "guard"), fill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    if (args.out / MARKER).exists():
        print(f"prepare: {args.out} is complete; nothing to do")
        return
    info = build(args.out.resolve(), key_from_env())
    print(f"prepare: wrote {info['train_tokens']} training, {info['heldout_tokens']} held-out code and "
          f"{info['guard_tokens']} held-out prose tokens to {args.out}")


if __name__ == "__main__":
    main()
