"""A speedrun-style trainer written here to try speedsearch on a record-shaped target (not copied
from the NanoGPT speedrun; it only has the same shape): a Hyperparameters dataclass, data shards
found by relative globs, torchrun, torch.compile before a timed region, and the record's
`step:N/M val_loss:X train_time:Yms step_avg:Zms` lines.

    NUM_ITERATIONS=400 SEED=0 torchrun --standalone --nproc_per_node=1 train_gpt.py

Shards: the speedrun's format (256 int32 header, magic 20240520, then uint16 tokens), byte-level
tokens (vocab 256), e.g. tinygpt's corpus linked at data/tinygpt.
"""

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Hyperparameters:
    train_files: str = "data/tinygpt/train_*.bin"
    val_files: str = "data/tinygpt/val_*.bin"
    num_iterations: int = int(os.environ.get("NUM_ITERATIONS", "400"))
    seed: int = int(os.environ.get("SEED", "0"))
    val_loss_every: int = 100
    val_tokens: int = 131072
    batch_size: int = 32
    seq_len: int = 512
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_iters: int = 20
    cooldown_frac: float = 0.4


args = Hyperparameters()


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.fc, self.out = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(256, cfg.n_embd), nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln = nn.LayerNorm(cfg.n_embd)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln(x), self.wte.weight)
        return F.cross_entropy(logits.float().reshape(-1, 256), targets.reshape(-1))


def shard(path):
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520, f"{path}: not a shard"
    return np.memmap(path, dtype=np.uint16, mode="r", offset=1024, shape=(int(header[2]),))


def files(pattern):
    found = sorted(Path.cwd().glob(pattern))
    assert found, f"no files match {pattern} under {Path.cwd()}"
    return found


def main():
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    torch.manual_seed(args.seed)
    train = np.concatenate([shard(f) for f in files(args.train_files)])
    val = shard(files(args.val_files)[0])[: args.val_tokens + 1]
    rng = np.random.default_rng(args.seed * 1000 + rank)

    def batch():
        starts = rng.integers(0, len(train) - args.seq_len - 1, args.batch_size)
        chunk = torch.from_numpy(np.stack([train[s:s + args.seq_len + 1] for s in starts]).astype(np.int64))
        return chunk[:, :-1].to(device, non_blocking=True), chunk[:, 1:].to(device, non_blocking=True)

    model = GPT(args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    run = torch.compile(model) if cuda else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def lr_at(step):
        if step < args.warmup_iters:
            return (step + 1) / args.warmup_iters
        left = (args.num_iterations - step) / args.num_iterations
        return 1.0 if left > args.cooldown_frac else left / args.cooldown_frac

    def train_step(step):
        x, y = batch()
        with autocast:
            loss = run(x, y)
        loss.backward()
        if ddp:
            for p in model.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def validate():
        run.eval()
        total, n = 0.0, 0
        with torch.no_grad(), autocast:
            span, end = args.seq_len * args.batch_size, args.val_tokens - args.seq_len
            for s in range(0, end, span):
                rows = [val[i:i + args.seq_len + 1] for i in range(s, min(s + span, end), args.seq_len)]
                chunk = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
                total += run(chunk[:, :-1], chunk[:, 1:]).item() * len(rows)
                n += len(rows)
        run.train()
        return total / n

    # compile and warm up outside the timed region, then start again from the initial state
    t_compile = time.perf_counter()
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for step in range(3):
        train_step(step)
    validate()
    model.load_state_dict(state)
    opt.load_state_dict(opt_state)
    if cuda:
        torch.cuda.synchronize()
    if rank == 0:
        print(f"compile_s:{time.perf_counter() - t_compile:.1f}", flush=True)

    training_ms, t0 = 0.0, time.perf_counter()
    for step in range(args.num_iterations + 1):
        last = step == args.num_iterations
        if last or step % args.val_loss_every == 0:
            if cuda:
                torch.cuda.synchronize()
            training_ms += 1000 * (time.perf_counter() - t0)
            loss = validate()
            if rank == 0:
                print(f"step:{step}/{args.num_iterations} val_loss:{loss:.4f} train_time:{training_ms:.0f}ms "
                      f"step_avg:{training_ms / max(step, 1):.2f}ms", flush=True)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if last:
            break
        train_step(step)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
