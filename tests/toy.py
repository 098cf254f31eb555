"""A toy trainer target for tests and benchmarks: prints speedrun lines, sleeps, and misbehaves on request.

Its loss falls as 3 * exp(-RATE * step / total) + 1, so raising RATE reaches a target loss sooner.
MODE picks a failure: crash, hang, nan, lie, oom, hang-child (a grandchild that ignores SIGTERM).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from search_space.target import Target, load_target

TRAIN = textwrap.dedent('''
    import argparse, math, os, random, signal, subprocess, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--data", default="")
    args = p.parse_args()

    # EVOLVE-BLOCK-START
    RATE = 1.0
    SLEEP = 0.01
    MODE = "ok"
    # EVOLVE-BLOCK-END

    random.seed(args.seed)
    t0 = time.perf_counter()
    if MODE == "crash":
        raise RuntimeError("boom: the trainer raised")
    if MODE == "oom":
        hog = bytearray(2 * 1024 ** 3)
        for i in range(0, len(hog), 4096):
            hog[i] = 1
    if MODE == "hang-child":
        subprocess.Popen([sys.executable, "-c",  # its run's folder in its argv: a test finds its own
                          "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
                          os.getcwd()])
    every = max(1, args.steps // 5)
    for step in range(args.steps + 1):
        if step % every == 0 or step == args.steps:
            ms = (time.perf_counter() - t0) * 1000
            loss = 1 + 3 * math.exp(-RATE * step / args.steps) + random.gauss(0, 0.002)
            if MODE == "nan" and step > 0:
                loss = float("nan")
            if MODE == "lie" and step > 0:
                ms = 1.0
            avg = ms / max(step, 1)
            print(f"step:{step}/{args.steps} val_loss:{loss:.4f} train_time:{ms:.0f}ms step_avg:{avg:.2f}ms",
                  flush=True)
            if MODE == "nan" and step > 0:
                sys.exit(1)
        if step < args.steps:
            time.sleep(SLEEP)
        if MODE in ("hang", "hang-child") and step == 1:
            time.sleep(600)
''')

TOML = '''
name = "toy"
ideas = "ideas.toml"
description = "a sleeping toy trainer for tests"
[repo]
path = "."
[run]
command = "python train.py --seed {seed} --steps {steps}"
[files]
editable = ["train.py"]
frozen = ["target.toml", "ideas.toml", "data.py"]
markers = true
[readout]
format = "speedrun"
[objective]
kind = "time_to_target"
target_loss = "baseline"
[fidelities]
smoke = { steps = 2 }
short = { steps = 10 }
full = { steps = 20 }
[resources]
gpus = GPUS
cpus = 1
memory_mb = 512
timeout_s = TIMEOUT
[[knobs]]
name = "rate"
type = "float"
low = 0.5
high = 3.0
via = "constant"
key = "RATE"
file = "train.py"
'''

IDEAS = '''
[[idea]]
name = "double-rate"
title = "Double the rate"
rationale = "the loss falls twice as fast"
edits = """
train.py
<<<<<<< SEARCH
RATE = 1.0
=======
RATE = 2.0
>>>>>>> REPLACE
"""

[[idea]]
name = "less-sleep"
title = "Sleep less per step"
rationale = "each step costs less time"
edits = """
train.py
<<<<<<< SEARCH
SLEEP = 0.01
=======
SLEEP = 0.005
>>>>>>> REPLACE
"""

[[idea]]
name = "crash"
title = "A change that crashes"
rationale = "for the failure path"
edits = """
train.py
<<<<<<< SEARCH
MODE = "ok"
=======
MODE = "crash"
>>>>>>> REPLACE
"""
'''


def make_toy(root: Path, *, sleep: float = 0.01, gpus: int = 0, timeout_s: float = 30,
             full: int = 20, short: int = 10) -> Target:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.py").write_text(TRAIN.replace("SLEEP = 0.01", f"SLEEP = {sleep}"))
    toml = TOML.replace("GPUS", str(gpus)).replace("TIMEOUT", str(float(timeout_s)))
    toml = toml.replace("full = { steps = 20 }", f"full = {{ steps = {full} }}")
    toml = toml.replace("short = { steps = 10 }", f"short = {{ steps = {short} }}")
    (root / "target.toml").write_text(toml)
    (root / "ideas.toml").write_text(IDEAS.replace("SLEEP = 0.01", f"SLEEP = {sleep}")
                                     .replace("SLEEP = 0.005", f"SLEEP = {sleep / 2}"))
    (root / "data.py").write_text("# frozen\n")
    return load_target(root)


def mode_patch(mode: str) -> str:
    return f'train.py\n<<<<<<< SEARCH\nMODE = "ok"\n=======\nMODE = "{mode}"\n>>>>>>> REPLACE\n'
