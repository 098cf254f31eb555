"""tinylm-bpb: a data-limited byte-level language model for speedsearch ("slowrun" style).

    python train.py --seed 0 --steps 240 --data DIR [--state DIR] [--resume DIR]

The data is the budget: DIR holds exactly the training bytes a run may use, code
(train_code.bin) and prose (train_text.bin), and nothing else. The score is bits per byte on
held-out code (of a secret language: search_space/targets/language.py), measured by speedsearch's
trusted evaluator from the checkpoints this trainer saves (model_server.py); a guard checks that next-byte accuracy on held-out prose does
not drop. Every step trains on BATCH windows of SEQ_LEN bytes (frozen: the objective is read at
a number of tokens), MIX of them drawn from the prose.

The EVOLVE block (hyperparameters, the model, the optimizer) is what a search may change. The
model maps int64 bytes [B, T] to logits [B, T, 256], each position seeing only earlier bytes.
At every validation the frozen loop prints `step:N/M val_start`, measures its own dev loss (on
the last DEV_TOKENS bytes of the code budget, which it never trains on), saves the weights to
ckpt/step_NNNNNN.pt and prints `step:N/M val_loss:X train_time:Yms step_avg:Zms` (X in nats).

With --state, each validation also saves what the run needs to go on (model, optimizer, the RNGs,
the data sampler's generator, which is the data position, and the training clock) before its line
is printed; --resume DIR continues exactly after that validation: the same batches, the same
weights, the same curve as an unbroken run, and a train_time that goes on from the saved one.
"""

import argparse
import math
import os
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
MIX = 0.5  # the share of each batch drawn from the prose
N_CTX = 12  # bytes of context each prediction sees
N_EMBD = 16
HIDDEN = 192


class Model(nn.Module):
    """A causal fixed-window MLP: each position's last N_CTX bytes (zero-padded at the start),
    embedded and concatenated, predict the next byte."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, N_EMBD)
        self.hidden = nn.Linear(N_CTX * N_EMBD, HIDDEN)
        self.out = nn.Linear(HIDDEN, 256)

    def forward(self, idx):  # [B, T] -> [B, T, 256]
        e = F.pad(self.embed(idx), (0, 0, N_CTX - 1, 0))  # [B, T + N_CTX - 1, E]
        ctx = e.unfold(1, N_CTX, 1)  # [B, T, E, N_CTX]: position t sees bytes t - N_CTX + 1 .. t
        return self.out(torch.tanh(self.hidden(ctx.flatten(2))))


def build_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
# EVOLVE-BLOCK-END

BATCH, SEQ_LEN = 16, 64  # 1024 tokens a step (target.toml: tokens_per_step)
VAL_EVERY = 40  # target.toml: trust.every
DEV_TOKENS = 4096
DEV_WINDOWS = 32
HEADER_INTS = 256
CKPT_PATTERN = "ckpt/step_{step:06d}.pt"  # target.toml: trust.checkpoints


def load_shard(path):
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    data = np.fromfile(path, dtype=np.uint16, offset=HEADER_INTS * 4)[: int(header[2])]
    return torch.from_numpy(data.astype(np.int64))


def batch(source, n, gen):
    starts = torch.randint(0, len(source) - SEQ_LEN - 1, (n,), generator=gen)
    chunk = source[starts[:, None] + torch.arange(SEQ_LEN + 1)]
    return chunk[:, :-1], chunk[:, 1:]


def save_checkpoint(model, step):
    """The weights at a validation step, for the trusted evaluator (model_server.py)."""
    path = Path(CKPT_PATTERN.format(step=step))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # complete or absent, never half-written


def save_state(folder, step, train_ms, model, opt, gen):
    """speedsearch's protocol (env/run_state.py): STEP is removed before the folder is rewritten and
    written last, holding the step the state is after."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "STEP").unlink(missing_ok=True)
    state = {"step": step, "train_ms": train_ms, "model": model.state_dict(), "opt": opt.state_dict(),
             "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "np_rng": np.random.get_state(),
             "py_rng": random.getstate()}
    torch.save(state, folder / "state.pt.tmp")
    os.replace(folder / "state.pt.tmp", folder / "state.pt")
    (folder / "STEP.tmp").write_text(str(step))
    os.replace(folder / "STEP.tmp", folder / "STEP")


def load_state(folder, model, opt, gen):
    """The step and training clock the state is after; everything else as it was then."""
    state = torch.load(Path(folder) / "state.pt", weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["np_rng"])
    random.setstate(state["py_rng"])
    return state["step"], state["train_ms"]


def main():
    p = argparse.ArgumentParser(description="tinylm-bpb trainer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--state", default="", help="a folder to save the resumable state to at each validation")
    p.add_argument("--resume", default="", help="a state folder to continue from (empty: start fresh)")
    args = p.parse_args()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    code, text = load_shard(args.data / "train_code.bin"), load_shard(args.data / "train_text.bin")
    code, dev = code[:-DEV_TOKENS], code[-DEV_TOKENS:]
    dev_starts = torch.linspace(0, len(dev) - SEQ_LEN - 1, DEV_WINDOWS).long()
    dev_chunk = dev[dev_starts[:, None] + torch.arange(SEQ_LEN + 1)]
    gen = torch.Generator().manual_seed(args.seed)
    model = Model()
    opt = build_optimizer(model)
    total = args.steps
    n_text = round(BATCH * min(max(MIX, 0.0), 1.0))
    done, train_ms = (load_state(args.resume, model, opt, gen) if args.resume  # before the first line:
                      else (-1, 0.0))  # a continued run's clock restarts at its first line
    print(f"tinylm-bpb params:{sum(p.numel() for p in model.parameters())} steps:{total} seed:{args.seed} "
          f"prose_rows:{n_text}/{BATCH}" + (f" resumed after step {done}" if done >= 0 else ""), flush=True)
    t0 = time.perf_counter()  # training time only, never validation
    for step in range(max(done, 0), total + 1):
        if (step % VAL_EVERY == 0 or step == total) and step != done:  # `done` was validated before the break
            train_ms += 1000 * (time.perf_counter() - t0) if step else 0.0
            print(f"step:{step}/{total} val_start", flush=True)
            model.eval()
            with torch.no_grad():
                val = F.cross_entropy(model(dev_chunk[:, :-1]).flatten(0, 1), dev_chunk[:, 1:].flatten()).item()
            model.train()
            save_checkpoint(model, step)
            if args.state:  # before the line: when the line arrives, its step is in the state
                save_state(Path(args.state), step, train_ms, model, opt, gen)
            print(f"step:{step}/{total} val_loss:{val:.4f} train_time:{train_ms:.0f}ms "
                  f"step_avg:{train_ms / max(step, 1):.2f}ms", flush=True)
            if not math.isfinite(val):
                raise SystemExit(1)
            t0 = time.perf_counter()
        if step == total:
            break
        xs, ys = [], []
        for source, n in ((code, BATCH - n_text), (text, n_text)):
            if n:
                x, y = batch(source, n, gen)
                xs.append(x)
                ys.append(y)
        x, y = torch.cat(xs), torch.cat(ys)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
