"""Red team of issue #12's trust surfaces: loss at a budget, guards, track-rule probes, long runs,
progress and packing. Each attack is a real candidate run through the real evaluate path (process
sandbox, the trusted evaluator, the run-state store); each test fails on the code before its fix.

The attacks use a trusted toy written here (numpy only, so a run costs seconds, not torch's start-up):
a bigram "model" whose candidate code is `logits(table, x)`, a frozen model server, a held-out split
and a guard corpus outside the run's mount, a `[checkpoint]` state, the no-test-time-training and
no-cross-document-attention rules, and a loss read at a budget (step 8 of 12). Its folders live under
/var/tmp, searchable by every user as a search's folder often is (pytest's own are private, which
hid what a run could read of its neighbours).
"""

from __future__ import annotations

import shutil
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from env.evaluate import RunSpec, evaluate, make_sandbox
from search_space.records import Status
from search_space.target import load_target
from tests.test_track_rules import write_shard

V = 16  # the toy's vocabulary

TRAIN = textwrap.dedent('''
    """A bigram trainer: each step counts the next CHUNK tokens' pairs; a checkpoint is the log-probability table."""
    import argparse
    import os
    import sys
    import time
    from pathlib import Path

    import numpy as np

    # EVOLVE-BLOCK-START
    LR = 1.0


    def logits(table, x):
        """The model: x [N, T] int64 -> logits [N, T, V], each position's row of the bigram table."""
        return table[x].astype(np.float32)
    # EVOLVE-BLOCK-END

    V, CHUNK, EVERY = 16, 64, 4


    def shard(path):
        n = int(np.fromfile(path, dtype=np.int32, count=256)[2])
        return np.fromfile(path, dtype=np.uint16, offset=1024)[:n].astype(np.int64)


    def save(path, arr):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(str(path) + ".tmp.npy", arr)
        os.replace(str(path) + ".tmp.npy", path)


    def save_state(folder, step, train_ms, counts):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "STEP").unlink(missing_ok=True)
        np.savez(folder / "state.tmp.npz", counts=counts, step=step, train_ms=train_ms)
        os.replace(folder / "state.tmp.npz", folder / "state.npz")
        (folder / "STEP.tmp").write_text(str(step))
        os.replace(folder / "STEP.tmp", folder / "STEP")


    def main():
        p = argparse.ArgumentParser()
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--steps", type=int, default=12)
        p.add_argument("--data", required=True)
        p.add_argument("--state", default="")
        p.add_argument("--resume", default="")
        a = p.parse_args()
        data = shard(Path(a.data) / "train_000.bin")
        train, dev = data[:-2000], data[-2000:]
        counts, done, train_ms = np.ones((V, V)), -1, 0.0
        if a.resume:
            s = np.load(Path(a.resume) / "state.npz")
            counts, done, train_ms = s["counts"], int(s["step"]), float(s["train_ms"])
        print(f"toy steps:{a.steps} seed:{a.seed}" + (f" resumed after step {done}" if done >= 0 else ""), flush=True)
        t0 = time.perf_counter()
        for step in range(max(done, 0), a.steps + 1):
            if (step % EVERY == 0 or step == a.steps) and step != done:
                train_ms += 1000 * (time.perf_counter() - t0) if step else 0.0
                print(f"step:{step}/{a.steps} val_start", flush=True)
                table = np.log(counts / counts.sum(1, keepdims=True))
                lg = logits(table, dev[None, :-1])[0].astype(np.float64)
                m = lg.max(-1)
                val = float(np.mean(np.log(np.exp(lg - m[:, None]).sum(-1)) + m - lg[np.arange(len(lg)), dev[1:]]))
                save(Path(f"ckpt/step_{step:06d}.npy"), table)
                if a.state:
                    save_state(Path(a.state), step, train_ms, counts)
                print(f"step:{step}/{a.steps} val_loss:{val:.4f} train_time:{train_ms:.0f}ms "
                      f"step_avg:{train_ms / max(step, 1):.2f}ms", flush=True)
                t0 = time.perf_counter()
            if step == a.steps:
                break
            pos = (a.seed * 7919 + step * CHUNK) % (len(train) - CHUNK - 1)
            c = train[pos:pos + CHUNK + 1]
            np.add.at(counts, (c[:-1], c[1:]), LR)
            time.sleep(0.02)


    if __name__ == "__main__":
        main()
''')

MODEL_SERVER = textwrap.dedent('''
    """The toy's frozen model server: the candidate's `logits` on each listed checkpoint, for the inputs."""
    import argparse
    import os
    import sys
    from pathlib import Path

    import numpy as np

    p = argparse.ArgumentParser()
    p.add_argument("--ckpts", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    sys.path.insert(0, os.getcwd())
    import train  # the candidate's model code

    x = np.load(a.inputs, allow_pickle=False).astype(np.int64)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, ckpt in enumerate(Path(a.ckpts).read_text().split()):
        lg = np.asarray(train.logits(np.load(ckpt, allow_pickle=False), x), dtype=np.float32)
        np.save(out / f"{i:03d}.tmp.npy", lg)
        os.replace(out / f"{i:03d}.tmp.npy", out / f"{i:03d}.npy")
''')

TOML = '''
name = "toy-trusted"
[run]
command = "python train.py --seed {{seed}} --steps {{steps}} --data {{data}} --state state --resume '{{resume}}'"
[files]
editable = ["train.py"]
frozen = ["model_server.py", "target.toml"]
markers = true
[objective]
kind = "loss_at_budget"
budget = "steps"
limit = 8  # the loss (and the guard) is read at step 8 of 12
[fidelities]
full = {{ steps = 12 }}
[checkpoint]
every = 4
path = "state"
[resources]
gpus = 0
cpus = 1
memory_mb = 512
timeout_s = 60
[data]
path = "{data}"
mount = "run"
[trust]
model_command = "python model_server.py --ckpts {{ckpts}} --inputs {{inputs}} --out {{out}}"
checkpoints = "ckpt/step_{{step:06d}}.npy"
heldout = "heldout/val_000.bin"
seq_len = 16
windows = 16
vocab = 16
every = 4
loss_tolerance = 0.5
clock_slack_ms = 200
startup_allowance_s = 30
probe_rows = 4
[rules]
test_time_training = false
cross_document_attention = false
doc_separator = 0
doc_rows = 4
[[guard]]
name = "g"
heldout = "guard/text_000.bin"
tolerance = 0.05
windows = 16
'''


def _chain(rng: np.random.Generator, n: int, sharp: float) -> np.ndarray:
    """n tokens of a Markov chain with a random transition matrix (sharper: more predictable)."""
    p = rng.dirichlet(np.full(V, 1 / sharp), size=V)
    out = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        out[i] = rng.choice(V, p=p[out[i - 1]])
    return out


@pytest.fixture(scope="module")
def public_root():
    """A folder every user may search (as a search's folder often is): what a sandboxed run could
    read of its neighbours is not hidden by a private /tmp or HOME here."""
    root = Path(tempfile.mkdtemp(prefix="speedsearch-redteam-", dir="/var/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def toy(public_root):
    folder = public_root / "toy"
    data = public_root / "data"
    for sub, mode in (("run", 0o755), ("heldout", 0o700), ("guard", 0o700)):
        (data / sub).mkdir(parents=True, mode=mode)
    data.chmod(0o755)
    rng = np.random.default_rng(7)
    text = _chain(rng, 26000, 2.0)  # the "code" the run trains on and the objective is measured on
    write_shard(data / "run" / "train_000.bin", text[:22000])
    write_shard(data / "heldout" / "val_000.bin", text[22000:])
    write_shard(data / "guard" / "text_000.bin", _chain(rng, 4000, 2.0))  # the guard's "prose": another chain
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN)
    (folder / "model_server.py").write_text(MODEL_SERVER)
    (folder / "target.toml").write_text(TOML.format(data=data))
    return load_target(folder)


def model_patch(code: str) -> str:
    """A SEARCH/REPLACE block that replaces the toy's model (`logits`) inside its EVOLVE block."""
    old = '''def logits(table, x):
    """The model: x [N, T] int64 -> logits [N, T, V], each position's row of the bigram table."""
    return table[x].astype(np.float32)
'''
    return f"train.py\n<<<<<<< SEARCH\n{old}=======\n{textwrap.dedent(code).strip()}\n>>>>>>> REPLACE\n"


def run(toy, root: Path, patch: str | None, run_id: str, **kw):
    return evaluate(RunSpec(toy, seed=1, fidelity="full", patch=patch, run_id=run_id), make_sandbox("process"),
                    root / "runs", **kw)


def test_the_honest_toy_is_trusted(toy, public_root):
    r = run(toy, public_root, None, "honest")
    assert r.status == Status.OK and r.trust == "trusted", r.reason
    assert [p.step for p in r.curve] == [0, 4, 8, 12]
    assert set(r.guards) == {"g"}
    trust = r.provenance["trust"]
    # the objective reads step 8 (limit = 8 of 12 steps): the probes and the guard judge that model
    assert trust["probe_step"] == 8 and trust["guards"]["g"]["step"] == 8, trust
    assert trust["guards"]["g"]["probe_max_change"] <= 1e-3


# --- cheating only where it counts ---------------------------------------------------------------------------
LOOKS_AHEAD = "out[np.arange(len(x))[:, None], np.arange(x.shape[1] - 1)[None, :], x[:, 1:]] += 12.0"

# The objective is the loss at step 8; the probes once tested only the last checkpoint (step 12). The
# model knows which checkpoint it is scoring (the server loads them in the listed order).
AT_THE_BUDGET_ONLY = model_patch(f'''
_CALLS = []


def logits(table, x):
    """Looks ahead, but only at one checkpoint (step 8's)."""
    out = table[x].astype(np.float32)
    if sys.argv[0].endswith("model_server.py"):  # the server loads the listed checkpoints in order
        names = Path(".trusted/ckpts.txt").read_text().split()
        name = names[len(_CALLS) % len(names)]
    else:  # the trainer's own validations, at steps 0, 4, 8, 12: its claim agrees with the measurement
        name = "step_%06d" % (4 * len(_CALLS))
    _CALLS.append(name)
    if "step_000008" in name:
        print("ATTACK: looking ahead at step 8", flush=True)
        {LOOKS_AHEAD}
    return out
''')

# Time to a target loss is read where the curve crosses it, at any validation; the look-ahead probe
# once tested only the last checkpoint. The model looks ahead only at step 4's: the curve crossed
# any target there.
AT_STEP_4_ONLY = AT_THE_BUDGET_ONLY.replace("step_000008", "step_000004").replace("at step 8", "at step 4")


def test_a_model_that_cheats_only_where_the_curve_crosses_is_probed_there(toy, public_root):
    import dataclasses

    timed = dataclasses.replace(toy, objective="time_to_target", target_loss=2.0)
    r = run(timed, public_root, AT_STEP_4_ONLY, "crossing", keep_workdir=True)
    assert "ATTACK: looking ahead at step 4" in _logs(public_root, "crossing")
    assert r.status == Status.INVALID and r.trust == "untrusted", (r.status, r.curve, r.reason)
    assert "look-ahead" in r.reason and "at the checkpoint of step 4" in r.reason


# The guard's windows were never probed: a model that looks ahead only on text unlike its training
# text (the guard's corpus) passed its guard at any cost to the real score.
AHEAD_ON_THE_GUARD = model_patch(f'''
def logits(table, x):
    """Honest on its own kind of text; looks ahead on another (the guard's)."""
    out = table[x].astype(np.float32)
    fit = float(np.mean(table[x[:, :-1], x[:, 1:]]))  # the text's log-likelihood against the model's own entropy
    if fit < float(np.mean((np.exp(table) * table).sum(1))) - 0.3:
        print("ATTACK: another kind of text, looking ahead (fit %.3f)" % fit, flush=True)
        {LOOKS_AHEAD}
    return out
''')


# The document probe's pass once held only its 2 x doc_rows rows (8 here, the normal pass 16), and it
# compared its rows with each other, never with the normal pass: a model that lets the previous
# document in everywhere but in a pass of that size broke the rule unseen.
ACROSS_DOCUMENTS = model_patch('''
def logits(table, x):
    """Each position after a document separator (token 0) sees the token before it: across documents."""
    out = table[x].astype(np.float32)
    if len(x) == 8:  # the document probe's pass
        print("ATTACK: the document probe, attention kept inside documents", flush=True)
        return out
    for n in range(len(x)):
        seps = np.flatnonzero(x[n] == 0)
        for a, b in zip(seps, list(seps[1:]) + [x.shape[1]]):
            if a > 0:
                out[n, a:b, 0] += 0.05 * x[n, a - 1]
    return out
''')


def test_the_document_probe_cannot_be_told_from_the_normal_pass(toy, public_root):
    r = run(toy, public_root, ACROSS_DOCUMENTS, "across-docs", keep_workdir=True)
    assert r.status == Status.INVALID and r.trust == "untrusted", (r.status, r.curve, r.reason)
    assert "no cross-document attention" in r.reason
    assert "ATTACK: the document probe" not in _logs(public_root, "across-docs")


def _logs(root: Path, run_id: str) -> str:
    return "\n".join(p.read_text() for p in sorted((root / "runs" / run_id).glob("*.log")))


def test_a_model_that_cheats_only_at_the_budgets_checkpoint_is_probed_there(toy, public_root):
    r = run(toy, public_root, AT_THE_BUDGET_ONLY, "at-budget", keep_workdir=True)
    assert "ATTACK: looking ahead at step 8" in _logs(public_root, "at-budget")
    assert r.status == Status.INVALID and r.trust == "untrusted", (r.status, r.curve, r.reason)
    assert "look-ahead" in r.reason


def test_a_guard_is_probed_for_look_ahead(toy, public_root):
    r = run(toy, public_root, AHEAD_ON_THE_GUARD, "guard-ahead", keep_workdir=True)
    assert "ATTACK: another kind of text, looking ahead" in _logs(public_root, "guard-ahead")
    assert r.status == Status.INVALID and r.trust == "untrusted", (r.status, r.guards, r.reason)
    assert "guard g: look-ahead" in r.reason


# --- the probes' model processes read each other's folders --------------------------------------------------
# The model looks ahead (the next input token gets a large logit: a near-perfect loss). A pass whose
# inputs equal no other pass's is a probe: it copies, row for row, the logits a normal pass wrote for
# its checkpoint, so the look-ahead probe (and the no-test-time-training probe) see nothing change.
COPIES_THE_NORMAL_PASS = model_patch('''
def logits(table, x):
    """Looks ahead; in a probe's process, answers with a normal pass's logits read from its folder."""
    import glob
    import time
    out = table[x].astype(np.float32)
    out[np.arange(len(x))[:, None], np.arange(x.shape[1] - 1)[None, :], x[:, 1:]] += 12.0
    if not sys.argv[0].endswith("model_server.py"):
        return out
    print("ATTACK: looking at the other passes' folders", flush=True)
    here = os.getcwd()
    mine = Path(".trusted/ckpts.txt").read_text().split()
    for _ in range(400):
        peers = {}
        for d in glob.glob(os.path.join(os.path.dirname(here), "*", ".trusted")):
            if os.path.dirname(d) == here or not os.path.exists(d + "/inputs.npy"):
                continue
            peers[d] = np.load(d + "/inputs.npy")
        normal = [d for d, v in peers.items() if any(np.array_equal(v, w) for e, w in peers.items() if e != d)]
        if any(np.array_equal(x, peers[d]) for d in normal) or len(peers) < 2:
            return out  # a normal pass (or nobody to copy from): cheat
        for d in normal:
            names = Path(d + "/ckpts.txt").read_text().split()
            if mine[0] in names and os.path.exists(d + "/out/%03d.npy" % names.index(mine[0])):
                theirs, rows = np.load(d + "/out/%03d.npy" % names.index(mine[0])), peers[d]
                match = [next((j for j in range(len(rows)) if np.array_equal(rows[j], row)), None) for row in x]
                if sum(m is not None for m in match) < len(x) // 2:
                    return out  # not a probe of these windows (the guard's corpus): cheat
                print("ATTACK: a probe, copying the logits of", d, flush=True)
                return theirs[[i if m is None else m for i, m in enumerate(match)]]
        time.sleep(0.05)
    return out
''')


def test_a_probe_cannot_copy_a_normal_pass(toy, public_root):
    """Every model process of a run's trusted evaluation once saw its siblings' folders (the run's
    folder was readable by the run's uid): a probe read the normal pass's logits and answered with
    them, and a model that looks ahead was `ok` and `trusted` at a near-zero loss."""
    r = run(toy, public_root, COPIES_THE_NORMAL_PASS, "copier", keep_workdir=True)
    logs = {p.name: p.read_text() for p in (public_root / "runs" / "copier").glob("*.log")}
    assert any("ATTACK: looking at the other passes' folders" in t for t in logs.values()), logs
    assert r.status == Status.INVALID and r.trust == "untrusted", (r.status, r.curve, r.reason)
    assert not any("ATTACK: a probe, copying" in t for t in logs.values()), logs
    assert "look-ahead" in r.reason


# --- neighbours: runs at once on one machine (packed on a GPU, or side by side) --------------------------------
# A training run that walks the search's folder for anything not its own: another run's workspace
# (a warm slot's, env/warm.py, or a cold run's), its checkpoints, the run-state store's states.
LOOKS_AROUND = model_patch('''
def logits(table, x):
    return table[x].astype(np.float32)


def _look_around():
    import time
    here = os.path.realpath(os.getcwd())
    search = Path(here).parents[2]  # runs/.warm/<slot> (or runs/<run>/work): the search's folder
    print("ATTACK: cwd", here, "walking", search, flush=True)
    seen = set()
    for _ in range(30):
        for root, dirs, files in os.walk(search):
            for name in files:
                path = os.path.realpath(os.path.join(root, name))
                if not path.startswith(here) and path not in seen and ("step_" in name or name.endswith(".state")
                                                                       or "train.py" in name):
                    seen.add(path)
                    print("ATTACK: saw", path, flush=True)
        time.sleep(0.1)


if not sys.argv[0].endswith("model_server.py"):
    _look_around()
''')
NUDGE = model_patch('''
def logits(table, x):
    return table[x].astype(np.float32) * 1.0
''')


def test_a_run_sees_none_of_its_neighbours(ray_cluster, toy, public_root):
    """Two warm runs side by side (each in its warm slot, env/warm.py) under a search folder that
    others may search: the attacker saw the other slot's workspace (its trainer, its checkpoints) and
    the run-state store's files, since the slots' folder and the store's were readable by the runs' uid."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from env.run_state import RunStateStore

    search = public_root / "search"
    store = RunStateStore.remote(str(search / "run_state"))
    ray.get(store.put.remote("someone-else", {"step": 4}, b"their weights"))
    boxes = [make_sandbox("process", warm=True) for _ in range(2)]
    try:
        # a first run in each sandbox starts the warm slot the next run of its kind takes
        firsts = [evaluate(RunSpec(toy, seed=2, fidelity="full", patch=NUDGE, run_id="first-a"), boxes[0],
                           search / "runs"),
                  evaluate(RunSpec(toy, seed=2, fidelity="full", run_id="first-b"), boxes[1], search / "runs")]
        assert all(r.status == Status.OK for r in firsts), [r.reason for r in firsts]
        with ThreadPoolExecutor(2) as ex:
            neighbour = ex.submit(evaluate, RunSpec(toy, seed=3, fidelity="full", run_id="neighbour"), boxes[1],
                                  search / "runs")
            attacker = evaluate(RunSpec(toy, seed=2, fidelity="full", patch=LOOKS_AROUND, run_id="attacker"),
                                boxes[0], search / "runs")
            assert neighbour.result().status == Status.OK
    finally:
        for box in boxes:  # the slots they started for a next run
            box.close()
    log = Path(attacker.log).read_text()
    assert "ATTACK: cwd" in log and "/.warm/" in log, log[-2000:]  # it ran in a warm slot
    assert attacker.status == Status.OK, attacker.reason
    assert "ATTACK: saw" not in log, "\n".join(line for line in log.splitlines() if "ATTACK: saw" in line)


# --- long runs: the state the trainer writes, and the continued run's clock ------------------------------------
def _continued(toy, root: Path, patch: str, run_id: str, store, key: str):
    """One segment of a checkpointed run through the real worker's path: its state restored from the
    store (when one was saved), watched and sent back (env/continuation.py)."""
    from env.continuation import Continuation

    spec = RunSpec(toy, seed=1, fidelity="full", patch=patch, run_id=run_id)
    return evaluate(spec, make_sandbox("process"), root / "runs", continuation=Continuation(spec, store, key))


# A state folder of thousands of empty files with long names: no file bytes to count against
# [checkpoint] max_mb, and a tar of megabytes (a header and a long name each) on the controller's disk.
EMPTY_FILES = model_patch('''
def logits(table, x):
    return table[x].astype(np.float32)


if not sys.argv[0].endswith("model_server.py"):
    _pad = Path("state") / ("p" * 200)
    _pad.mkdir(parents=True, exist_ok=True)
    for _i in range(3000):
        (_pad / ("%04d" % _i + "x" * 150)).touch()
    print("ATTACK: 3000 empty files in the state folder", flush=True)
    import atexit
    import time
    atexit.register(time.sleep, 1.5)  # alive while the watcher packs the last state
''')


def test_a_state_of_empty_files_is_held_to_its_cap(ray_cluster, toy, public_root):
    import dataclasses

    import ray

    from env.run_state import RunStateStore

    capped = dataclasses.replace(toy, checkpoint=dataclasses.replace(toy.checkpoint, max_mb=1))
    store = RunStateStore.remote(None)
    r = _continued(capped, public_root, EMPTY_FILES, "empty-files", store, "k")
    assert "ATTACK: 3000 empty files" in Path(r.log).read_text()
    got = ray.get(store.get.remote("k"))
    assert got is None, f"a state of {len(got[1]) / 2**20:.1f} MiB was kept against a cap of 1 MiB"
    assert "over its cap of 1 MiB" in r.provenance["checkpoint_problem"]


# A continued trainer that trains before it prints anything: the restart (launch to first line) was
# left off the continued run's clock, and the start-up check measured it against the virtual clock,
# where a first segment longer than the silence (hours, in a real long run) hid it.
SILENT_RESTART = model_patch('''
_CALLS = []


def logits(table, x):
    if not sys.argv[0].endswith("model_server.py"):
        _CALLS.append(1)
        if len(_CALLS) == 3 and not _RESUMED:
            import time
            time.sleep(2.5)  # the first segment: lost at its validation of step 8, after step 4's state went
            os._exit(3)
    return table[x].astype(np.float32)


_RESUMED = "--resume" in sys.argv and sys.argv[sys.argv.index("--resume") + 1] != ""
if not sys.argv[0].endswith("model_server.py"):
    import time
    if _RESUMED:
        time.sleep(3.5)  # (a real attack trains here; the sleep stands in for it)
        print("ATTACK: trained silently before the first line", flush=True)
    else:  # a long first segment: its first four steps take 1.2 s each (on its own clock too)
        _sleep, _steps = time.sleep, []
        time.sleep = lambda s: (_steps.append(s), _sleep(1.2 if len(_steps) <= 4 else s))
''')


def test_a_continued_run_cannot_train_before_its_first_line_for_free(ray_cluster, toy, public_root):
    import dataclasses

    import ray

    from env.run_state import RunStateStore

    quick = dataclasses.replace(toy, trust=dataclasses.replace(toy.trust, startup_allowance_s=2.0))
    store = RunStateStore.remote(None)
    lost = _continued(quick, public_root, SILENT_RESTART, "silent-1", store, "k")
    assert lost.status == Status.FAILED, lost.reason  # the stand-in for a lost node: the state stays
    assert ray.get(store.get.remote("k"))[0]["step"] == 4
    r = _continued(quick, public_root, SILENT_RESTART, "silent-2", store, "k")
    assert r.provenance["continued"]["from"] == 4
    assert "ATTACK: trained silently" in Path(r.log).read_text()
    assert r.status == Status.INVALID and r.trust == "untrusted", (r.status, r.curve, r.reason)
    assert "start-up: the continued run printed its first line" in r.reason
