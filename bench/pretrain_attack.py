"""Training before step 0, against tinylm-bpb's checks: a candidate pretrains inside its start-up
allowance (off the clock and off the step count) on its own 128 KiB budget, through the real
`evaluate` (process sandbox, trusted evaluator), then the verdict's guard code.

- "show": step 0's checkpoint is the pretrained model. Goal: `invalid` ([trust] fresh_start).
- "swap": an untrained step 0 is saved, then the pretrained weights are loaded. It passes every
  check of the run; goal: the cpu guard refuses it (its CPU seconds over 1.5x the base's).
- A/A: the base against itself, seed by seed. Goal: the cpu guard holds (an honest candidate with
  the base's compute is not refused).

    python -m bench.pretrain_attack                 # 3 seeds at full: 12 trusted runs
    python -m bench.pretrain_attack --seeds 4 --fidelity short
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from statistics import mean

from bench.common import print_table
from env.data import ensure_data
from env.evaluate import RunSpec, evaluate, make_sandbox
from search_space import guard
from search_space.target import load_target

PRETRAIN = '''
def build_optimizer(model, _steps=PRETRAIN_STEPS, _mode="MODE"):
    import copy as _copy
    import sys as _sys
    _data = Path(_sys.argv[_sys.argv.index("--data") + 1])
    _code = load_shard(_data / "train_code.bin")
    _gen = torch.Generator().manual_seed(12345)
    _fresh = _copy.deepcopy(model.state_dict())
    _opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    for _ in range(_steps):
        _x, _y = batch(_code, BATCH, _gen)
        _loss = F.cross_entropy(model(_x).flatten(0, 1), _y.flatten())
        _opt.zero_grad(set_to_none=True)
        _loss.backward()
        _opt.step()
    if _mode == "swap":
        _trained = _copy.deepcopy(model.state_dict())
        model.load_state_dict(_fresh)
        _save = globals()["save_checkpoint"]
        def _swapping(m, step):
            _save(m, step)
            if step == 0:  # the untrained step 0 is on disk: now the weights it trained
                m.load_state_dict(_trained)
        globals()["save_checkpoint"] = _swapping
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
'''


def pretraining(mode: str, steps: int) -> str:
    """tinylm-bpb's train.py patched to train `steps` steps before step 0 ("show" or "swap")."""
    old = ("def build_optimizer(model):\n"
           "    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)\n")
    new = PRETRAIN.replace("PRETRAIN_STEPS", str(steps)).replace("MODE", mode).lstrip("\n")
    return f"train.py\n<<<<<<< SEARCH\n{old}=======\n{new}>>>>>>> REPLACE\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fidelity", default="full")
    ap.add_argument("--steps", type=int, default=800, help="pretraining steps before step 0")
    args = ap.parse_args()
    target = load_target("tinylm-bpb")
    ensure_data(target)
    cpu = next(g for g in target.guards if g.score == guard.CPU)
    sandbox = make_sandbox("process", target)
    runs: dict[str, dict] = {k: {} for k in ("base", "again", "swap", "show")}
    patches = {"base": None, "again": None, "swap": pretraining("swap", args.steps),
               "show": pretraining("show", args.steps)}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, args.seeds + 1):
            order = list(runs) if seed % 2 else list(reversed(runs))  # alternate: drift cancels
            for who in order:
                runs[who][seed] = evaluate(RunSpec(target, seed=seed, fidelity=args.fidelity, patch=patches[who],
                                                   run_id=f"{who}-{seed}"), sandbox, Path(tmp))
    for who in ("base", "again", "swap"):
        bad = [r for r in runs[who].values() if r.status.value != "ok" or not r.trusted]
        if bad:
            raise SystemExit(f"{who} seed {bad[0].seed}: {bad[0].status.value} {bad[0].reason[:500]}")
    rows = []
    for s in range(1, args.seeds + 1):
        b, a, w, h = (runs[k][s] for k in ("base", "again", "swap", "show"))
        rows.append([str(s), f"{b.final.val_loss:.3f}", f"{w.final.val_loss:.3f}", f"{b.guards[cpu.name]:.2f}",
                     f"{a.guards[cpu.name]:.2f}", f"{w.guards[cpu.name]:.2f}", h.status.value])
    aa = guard.check_runs([cpu], list(runs["again"].values()), runs["base"])[0]
    attack = guard.check_runs([cpu], list(runs["swap"].values()), runs["base"])[0]
    shown = [r for r in runs["show"].values() if r.status.value == "invalid" and "step 0:" in r.reason]
    gain = mean(runs["base"][s].final.val_loss - runs["swap"][s].final.val_loss for s in runs["base"])
    print_table(f"tinylm-bpb at {args.fidelity}: {args.steps} steps trained before step 0, through evaluate",
                ["seed", "base bpb", "swap bpb", "base CPU s", "base again CPU s", "swap CPU s", "show"], rows)
    print_table("goals", ["what", "figure", "goal", "result"], [
        ["show: a trained step 0", f"{len(shown)}/{args.seeds} invalid at step 0", "all invalid",
         "PASS" if len(shown) == args.seeds else "FAIL"],
        ["swap: what it would have won", f"bpb {gain:+.3f} better than the base", "(> 0: the attack pays)", ""],
        ["swap: the cpu guard", attack.text(), "fails", "PASS" if not attack.passed else "FAIL"],
        ["A/A: the cpu guard", aa.text(), "holds", "PASS" if aa.passed else "FAIL"],
    ])
    if len(shown) != args.seeds or attack.passed or not aa.passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
