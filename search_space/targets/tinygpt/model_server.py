"""tinygpt's model server for speedsearch's trusted evaluator (frozen; see target.toml [trust]).

    python model_server.py --preset cpu --ckpts LIST --inputs X.npy --out DIR [--go FILE]

Loads the candidate's model code (`build_model` from train.py in this folder), then for the i-th
checkpoint listed in LIST (one path a line) writes DIR/{i:03d}.npy: float32 logits [N, T, vocab]
for the int64 input windows X [N, T]. It never sees the next tokens of the windows; the host that
started it computes the loss, and checks causality with a second, perturbed pass in a fresh process.
Any error exits non-zero with the reason on stderr.

With --go, it starts early (beside the training run): it imports torch and readies the device,
then waits for FILE, which the host writes once the training run has ended and LIST and X are in
place. Only then does it load the candidate's code, so the import cost overlaps training and no
candidate code runs while the training run does.
"""

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

BATCH = 64


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--ckpts", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--go", type=Path, default=None, help="wait for this file before loading anything")
    args = parser.parse_args()
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.zeros(1, device=device)  # the device's context, ready before the wait
    if args.go is not None:
        (args.go.parent / "waiting").touch()  # tells the host this process is up, inside its sandbox
        while not args.go.exists():
            time.sleep(0.005)
    t0 = time.perf_counter()
    sys.path.insert(0, os.getcwd())
    import train  # the candidate's model code: it runs here, behind the host's process boundary

    run = train.RUNS[args.preset]
    cfg = SimpleNamespace(**train.PRESETS[args.preset], preset=args.preset, device=device,
                          vocab_size=train.VOCAB_SIZE, val_seq_len=run["val_seq_len"],
                          total_steps=run["steps"], seed=0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    x = torch.from_numpy(np.load(args.inputs, allow_pickle=False).astype(np.int64)).to(device)
    model = train.build_model(cfg).to(device)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpts = args.ckpts.read_text().split()
    for i, ckpt in enumerate(ckpts):
        try:
            state = torch.load(ckpt, map_location=device, weights_only=True)
            model.load_state_dict(state)
        except Exception as e:  # the host reports it as an unloadable checkpoint
            raise SystemExit(f"checkpoint {ckpt} does not load: {type(e).__name__}: {e}") from None
        model.eval()
        out = np.empty((*x.shape, train.VOCAB_SIZE), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(x), BATCH):
                with autocast:
                    logits = model(x[start:start + BATCH])
                out[start:start + BATCH] = logits.float().cpu().numpy()
        np.save(args.out / f"{i:03d}.tmp.npy", out)
        os.replace(args.out / f"{i:03d}.tmp.npy", args.out / f"{i:03d}.npy")
    print(f"model_server: {len(ckpts)} checkpoints x {len(x)} windows in {time.perf_counter() - t0:.2f} s", flush=True)


if __name__ == "__main__":
    main()
