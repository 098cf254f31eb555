"""tinylm-bpb's model server for speedsearch's trusted evaluator (frozen; see target.toml [trust]).

    python model_server.py --ckpts LIST --inputs X.npy --out DIR [--go FILE]

Loads the candidate's `Model` from train.py in this folder, then for the i-th checkpoint listed in
LIST writes DIR/{i:03d}.npy: float32 logits [N, T, 256] for the int64 input windows X [N, T]. It
never sees the next bytes; the host computes the bits per byte and the guard's accuracy. With
--go it starts beside the training run, imports torch, and waits for FILE before loading any
candidate code.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

BATCH = 64


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpts", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--go", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.go is not None:
        (args.go.parent / "waiting").touch()  # this process is up, inside its sandbox
        while not args.go.exists():
            time.sleep(0.005)
    sys.path.insert(0, os.getcwd())
    import train  # the candidate's model code, behind the host's process boundary

    x = torch.from_numpy(np.load(args.inputs, allow_pickle=False).astype(np.int64))
    model = train.Model()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, ckpt in enumerate(args.ckpts.read_text().split()):
        try:
            model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        except Exception as e:  # the host reports it as an unloadable checkpoint
            raise SystemExit(f"checkpoint {ckpt} does not load: {type(e).__name__}: {e}") from None
        model.eval()
        out = np.empty((*x.shape, 256), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(x), BATCH):
                out[start:start + BATCH] = model(x[start:start + BATCH]).float().numpy()
        np.save(args.out / f"{i:03d}.tmp.npy", out)
        os.replace(args.out / f"{i:03d}.tmp.npy", args.out / f"{i:03d}.npy")


if __name__ == "__main__":
    main()
