"""tinygpt: a deliberately plain GPT trainer (the 2024 llm.c starting point) for speedsearch.

    python train.py --seed 0 --steps 300 --data DIR [--preset cpu|gpu]

The EVOLVE block below (hyperparameters, model, optimizers, schedule, training step) is what a
search may change. Everything outside it is frozen: arguments, seeding, data loading, the fixed
validation set and its loss, timing and logging. The block must define:

    PRESETS[preset]                      a dict of whatever the block needs; copied into `cfg`
    build_model(cfg)                     -> nn.Module; model(idx [B, T] int64) -> logits [B, T, 256]
    build_optimizers(model, cfg)         -> list of torch optimizers
    train_step(model, opts, next_batch, step, cfg) -> training loss (a tensor)

`cfg` carries the preset's entries plus preset, device, vocab_size, val_seq_len (the model must
accept sequences that long), total_steps and seed. At every validation the frozen loop prints
`step:N/M val_start`, validates, saves the model's state_dict to ckpt/step_NNNNNN.pt and prints the
val_loss line: speedsearch's evaluator rebuilds the model with build_model(cfg), loads that state
(so everything the model needs must be in it) and recomputes the loss on held-out data in a separate
process (model_server.py); the logged val_loss is on a dev split and is only checked against it. `next_batch(B, T)` returns (x, y) on the
device: B random windows of T training tokens and their next tokens. On CUDA, train_step and
validation run under bf16 autocast, the model is compiled, and a few untimed warm-up steps run
first; the model and optimizer states are then restored, so train_step must keep its state there.
"""

import argparse
import copy
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# EVOLVE-BLOCK-START
LEARNING_RATE = 1e-3  # AdamW peak learning rate
WEIGHT_DECAY = 0.1
BETA1 = 0.9
BETA2 = 0.95
WARMUP_STEPS = 10
GRAD_CLIP = 1.0
PRESETS = {  # model and batch: layers, width, heads, sequences per step, tokens per sequence
    "cpu": dict(n_layer=2, n_embd=64, n_head=4, batch_size=16, seq_len=128),
    "gpu": dict(n_layer=6, n_embd=384, n_head=6, batch_size=32, seq_len=1024),
}
Norm = nn.LayerNorm


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_head, self.head_dim)
        v = v.view(B, T, self.n_head, self.head_dim)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.attn = Norm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln2, self.mlp = Norm(cfg.n_embd), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(max(cfg.seq_len, cfg.val_seq_len), cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = Norm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.lm_head.weight = self.wte.weight  # tied input and output embedding
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2: residual projections scaled down by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build_model(cfg):
    return GPT(cfg)


def build_optimizers(model, cfg):
    """AdamW; weight decay on matrices and embeddings only (the llm.c convention)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=WEIGHT_DECAY), dict(params=no_decay, weight_decay=0.0)]
    return [torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(BETA1, BETA2), eps=1e-8)]


def lr_schedule(step, total_steps):
    """Multiplier of each group's base learning rate: a linear warmup, then constant."""
    return min(1.0, (step + 1) / WARMUP_STEPS)


def train_step(model, opts, next_batch, step, cfg):
    x, y = next_batch(cfg.batch_size, cfg.seq_len)
    loss = F.cross_entropy(model(x).float().reshape(-1, cfg.vocab_size), y.reshape(-1))
    loss.backward()
    if GRAD_CLIP:
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    scale = lr_schedule(step, cfg.total_steps)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * scale
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss.detach()
# EVOLVE-BLOCK-END


VOCAB_SIZE = 256  # bytes
MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
RUNS = {  # frozen per preset: default steps, logging cadence, and the fixed validation set
    "cpu": dict(steps=300, val_every=20, log_every=20, val_seq_len=128, val_seqs=128, val_batch=64),
    "gpu": dict(steps=1000, val_every=100, log_every=25, val_seq_len=1024, val_seqs=512, val_batch=64),
}
CUDA_WARMUP_STEPS = 3
CKPT_PATTERN = "ckpt/step_{step:06d}.pt"  # relative to the working folder; target*.toml [trust] checkpoints


def load_shard(path):
    """The tokens of one .bin shard (memory-mapped), after checking its header."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != MAGIC or header[1] != VERSION:
        raise SystemExit(f"{path}: not a version-{VERSION} token shard (magic {MAGIC})")
    n = int(header[2])
    if path.stat().st_size != HEADER_INTS * 4 + 2 * n:
        raise SystemExit(f"{path}: header says {n} tokens but the file size disagrees")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n,))


class TrainData:
    """Random windows of the training shards, drawn from a generator seeded by --seed."""

    def __init__(self, paths, seed, device):
        self.shards = [load_shard(p) for p in paths]
        sizes = np.array([len(s) for s in self.shards], dtype=np.float64)
        self.p = sizes / sizes.sum()
        self.rng = np.random.default_rng(seed)
        self.device = device

    def __call__(self, batch_size, seq_len):
        which = self.rng.choice(len(self.shards), size=batch_size, p=self.p)
        rows = []
        for i in which:
            start = int(self.rng.integers(0, len(self.shards[i]) - seq_len - 1))
            rows.append(self.shards[i][start:start + seq_len + 1])
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        if self.device == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]


def fixed_val_set(path, run, device):
    """The same val_seqs windows for every run: evenly spaced over the validation shard."""
    tokens, n, T = load_shard(path), run["val_seqs"], run["val_seq_len"]
    starts = np.linspace(0, len(tokens) - T - 1, n).astype(np.int64)
    windows = torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int64))
    return windows.to(device)


@torch.no_grad()
def evaluate(model, windows, batch, autocast):
    model.eval()
    losses = []
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        with autocast:
            logits = model(w[:, :-1])
        losses.append(F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), w[:, 1:].reshape(-1)))
    model.train()
    return torch.stack(losses).mean().item()


def save_checkpoint(model, step):
    """The raw model's weights at a validation step, for the trusted evaluator (model_server.py)."""
    path = Path(CKPT_PATTERN.format(step=step))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # complete or absent, never half-written


def main():
    parser = argparse.ArgumentParser(description="tinygpt trainer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--data", type=Path, required=True,
                        help="folder of train_*.bin and val_000.bin (the dev split; the held-out split is elsewhere)")
    parser.add_argument("--preset", choices=sorted(RUNS), default="cpu")
    args = parser.parse_args()
    run = RUNS[args.preset]
    total = args.steps if args.steps is not None else run["steps"]
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Under torchrun: one process per GPU, gradients averaged by DDP, rank 0 logs.
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    say = print if rank == 0 else (lambda *a, **k: None)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()

    train_paths = sorted(args.data.glob("train_*.bin"))
    if not train_paths:
        raise SystemExit(f"{args.data}: no train_*.bin shards (run prepare.py --out {args.data})")
    val_windows = fixed_val_set(args.data / "val_000.bin", run, device)
    cfg = SimpleNamespace(**PRESETS[args.preset], preset=args.preset, device=device, vocab_size=VOCAB_SIZE,
                          val_seq_len=run["val_seq_len"], total_steps=total, seed=args.seed)
    raw_model = build_model(cfg).to(device)
    opts = build_optimizers(raw_model, cfg)
    model = raw_model
    n_params = sum(p.numel() for p in raw_model.parameters())
    say(f"tinygpt preset:{args.preset} device:{device} params:{n_params} steps:{total} seed:{args.seed} "
        f"world:{world}", flush=True)
    if world > 1:
        model = DDP(raw_model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)

    if device == "cuda":  # compile outside the timed region, then start again from the initial state
        t_compile = time.perf_counter()
        model = torch.compile(model)
        saved = copy.deepcopy(raw_model.state_dict()), [copy.deepcopy(o.state_dict()) for o in opts]
        warm_data = TrainData(train_paths, args.seed + 1, device)
        for step in range(CUDA_WARMUP_STEPS):
            with autocast:
                train_step(model, opts, warm_data, step, cfg)
        evaluate(model, val_windows[:run["val_batch"]], run["val_batch"], autocast)
        raw_model.load_state_dict(saved[0])
        for opt, state in zip(opts, saved[1]):
            opt.load_state_dict(state)
        torch.cuda.synchronize()
        say(f"compile_and_warmup_s:{time.perf_counter() - t_compile:.1f}", flush=True)
    data = TrainData(train_paths, args.seed + 7919 * rank, device)  # each rank its own windows

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def line(step, name, value, train_ms):
        return (f"step:{step}/{total} {name}:{value:.4f} train_time:{train_ms:.0f}ms "
                f"step_avg:{train_ms / max(step, 1):.2f}ms")

    train_ms, t0 = 0.0, time.perf_counter()  # train_ms counts training only, never validation
    for step in range(total + 1):
        if step % run["val_every"] == 0 or step == total:
            sync()
            train_ms += 1000 * (time.perf_counter() - t0) if step else 0.0
            # The pause marker lets the host's clock see where training stopped; the checkpoint lets
            # its evaluator recompute this point on data this run never sees (both untimed).
            say(f"step:{step}/{total} val_start", flush=True)
            val_loss = evaluate(model, val_windows, run["val_batch"], autocast)
            if rank == 0:
                save_checkpoint(raw_model, step)
            say(line(step, "val_loss", val_loss, train_ms), flush=True)
            if not math.isfinite(val_loss):
                sys.exit(1)
            t0 = time.perf_counter()
        if step == total:
            break
        with autocast:
            loss = train_step(model, opts, data, step, cfg)
        if (step + 1) % run["log_every"] == 0 or step + 1 == total:
            train_loss = loss.item()  # waits for the device
            elapsed = train_ms + 1000 * (time.perf_counter() - t0)
            say(line(step + 1, "train_loss", train_loss, elapsed), flush=True)
            if not math.isfinite(train_loss):
                say(line(step + 1, "val_loss", float("nan"), elapsed), flush=True)
                sys.exit(1)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
