"""tinylm-epochs: a small byte-level language model trained for whole epochs on a fixed slice of
data, the way a hobbyist's trainer runs for hours; it prints its own table, not speedrun lines.

    python train.py --seed 0 --epochs 8 --data DIR

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--data", required=True)
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
    best = math.inf
    for epoch in range(1, args.epochs + 1):
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
        print(f"| {epoch} | {N_CTX} | {val:.4f} | {math.exp(val):.3f} | {note} |", flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)
