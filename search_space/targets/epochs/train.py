"""tinylm-epochs: a small byte-level language model trained for whole epochs on a fixed slice of
data, the way a hobbyist's trainer runs for hours; it prints its own table, not speedrun lines.

    python train.py --seed 0 --epochs 8 --data DIR [--state DIR] [--resume DIR]

With --state, the trainer saves everything it needs to go on (model, optimizer, RNG states, the
epoch) after each epoch, and --resume DIR (a state saved by an earlier run of the same command)
continues exactly where that state was taken: the continued curve equals an unbroken run's.

An epoch is EPOCH_BATCHES batches drawn from the first EPOCH_TOKENS training tokens (the same
tokens every epoch: the data is the budget). After each epoch the frozen code below measures the
next-byte loss on a fixed set of dev windows and prints one row of its table:

    | epoch | n_ctx | loss | ppl | note |

speedsearch reads that table through a regex readout (target.toml): the ppl column, converted to a
loss. The EVOLVE block (hyperparameters and the model) is what a search may change; the data, the
epoch, the validation and the table are frozen.
"""

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# EVOLVE-BLOCK-START
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.0
BATCH_SIZE = 64
N_CTX = 16  # bytes of context the model sees
N_EMBD = 24
HIDDEN = 192


class Model(nn.Module):
    """A fixed-window MLP: the last N_CTX bytes, embedded and concatenated, predict the next one."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, N_EMBD)
        self.hidden = nn.Linear(N_CTX * N_EMBD, HIDDEN)
        self.out = nn.Linear(HIDDEN, 256)

    def forward(self, ctx):  # ctx [B, N_CTX] int64 -> logits [B, 256]
        h = self.embed(ctx).flatten(1)
        return self.out(torch.tanh(self.hidden(h)))


def build_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
# EVOLVE-BLOCK-END

EPOCH_TOKENS = 2**20  # the slice every epoch draws from
EPOCH_BATCHES = 150
VAL_WINDOWS = 2048
HEADER_INTS = 256


def tokens(path, limit):
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    n = int(header[2])
    data = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n,))
    return torch.from_numpy(np.asarray(data[:limit], dtype=np.int64))


def windows(data, starts):
    idx = starts[:, None] + torch.arange(N_CTX + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, -1]


def save_state(folder, epoch, best, model, opt):
    """speedsearch's protocol (env/run_state.py): STEP goes first when the state is rewritten and comes
    back last, holding the epoch the state is after."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "STEP").unlink(missing_ok=True)
    state = {"epoch": epoch, "best": best, "model": model.state_dict(), "opt": opt.state_dict(),
             "torch_rng": torch.get_rng_state(), "py_rng": random.getstate()}
    torch.save(state, folder / "state.pt.tmp")
    (folder / "state.pt.tmp").replace(folder / "state.pt")
    (folder / "STEP.tmp").write_text(str(epoch))
    (folder / "STEP.tmp").replace(folder / "STEP")


def load_state(folder, model, opt):
    """The epoch and best loss the state is after; the model, optimizer and RNGs as they were then."""
    state = torch.load(Path(folder) / "state.pt", weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["py_rng"])
    return state["epoch"], state["best"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--data", required=True)
    p.add_argument("--state", default="", help="a folder to save the resumable state to after each epoch")
    p.add_argument("--resume", default="", help="a state folder to continue from (empty: start fresh)")
    args = p.parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    root = Path(args.data)
    train = tokens(sorted(root.glob("train_*.bin"))[0], EPOCH_TOKENS)
    dev = tokens(root / "val_000.bin", 2**18)
    val_gen = torch.Generator().manual_seed(1234)  # the same dev windows for every run
    val_x, val_y = windows(dev, torch.randint(0, len(dev) - N_CTX - 1, (VAL_WINDOWS,), generator=val_gen))
    model = Model()
    opt = build_optimizer(model)
    print("| epoch | n_ctx | loss | ppl | note |", flush=True)
    print("|---|---|---|---|---|", flush=True)
    best, done = math.inf, 0
    if args.resume:
        done, best = load_state(args.resume, model, opt)
        print(f"resumed after epoch {done}", flush=True)
    for epoch in range(done + 1, args.epochs + 1):
        model.train()
        for _ in range(EPOCH_BATCHES):
            x, y = windows(train, torch.randint(0, len(train) - N_CTX - 1, (BATCH_SIZE,)))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = F.cross_entropy(model(val_x), val_y).item()
        note = "best" if val < best else ""
        best = min(best, val)
        if args.state:  # saved before the row is printed: the row's epoch is in the state when it arrives
            save_state(Path(args.state), epoch, best, model, opt)
        print(f"| {epoch} | {N_CTX} | {val:.4f} | {math.exp(val):.3f} | {note} |", flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)
