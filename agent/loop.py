"""The search loop: keep every worker busy, record results as they arrive, resume after any crash.

Proposals (an LLM call takes tens of seconds) run ahead of evaluations in a thread pool; runs go
to the Ray pool one seed at a time; a trial is one candidate evaluated at one rung. Everything the
loop knows is in the runs database, so `--resume` rebuilds the queue from it.
"""

from __future__ import annotations

import heapq
import itertools
import math
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from agent.baseline import Baseline, build_baseline, run_fidelity
from agent.candidates import Candidates, Record
from agent.ladder import next_rung
from agent.live import Live
from agent.policy import STATE_KEY, Node, Policy
from agent.proposal import Proposer
from agent.recorder import Recorder
from agent.resume import INTERRUPTED, restore
from agent.settings import LADDER, SearchSettings
from agent.trials import Meter, Open, Pending, Summary
from env.evaluate import RunSpec
from env.pool import Pool
from env.stats import objective
from runs_db.db import RunsDB
from search_space.records import RunResult, Status
from search_space.target import Target

PRIORITY = {"baseline": 0, "confirm": 1, "full": 2, "short": 3, "smoke": 4}
NONE_STREAK = 8  # an arm that had nothing to offer this many times in a row is retired


class Search:
    def __init__(self, db: RunsDB, target: Target, settings: SearchSettings, pool: Pool,
                 proposers: dict[str, Proposer], live: Live | None = None):
        self.db, self.target, self.settings, self.pool = db, target, settings, pool
        self.proposers = proposers
        self.arms = [f"llm:{m}" if name == "llm" else name for name in settings.proposers
                     for m in (settings.model_weights() if name == "llm" else [None])]
        self.policy = Policy(self.arms, seed=settings.seed)
        self.policy.load(db.get_state(STATE_KEY, None))
        self.candidates = Candidates(db, target)
        self.live = live or Live(enabled=False)
        self.capacity = settings.workers or pool.capacity(target.resources.cpus, target.resources.gpus)
        self.queue: list[tuple[int, int, Pending]] = []
        self.counter = itertools.count()
        self.inflight: dict = {}  # ObjectRef -> (trial number, seed)
        self.open: dict[int, Open] = {}
        self.futures: dict[Future, tuple[str, str]] = {}
        self.baselines: dict[str, Baseline] = {}
        self.values: dict[tuple[str, str], float] = {}  # (commit, rung) -> objective
        self.summary = Summary()
        self.none_streak: dict[str, int] = {}
        self.meter = Meter()
        self.dry: dict[str, set[str]] = {}  # arm -> parents it had nothing left for
        self.started = time.time()
        self.recorder = Recorder()
        self.next_number = 0  # Optuna numbers trials 0, 1, 2, ... in the order this loop starts them
        self.threads = ThreadPoolExecutor(max_workers=max(2, min(8, self.capacity + 1)),
                                          thread_name_prefix="propose")

    # --- queue
    def push(self, p: Pending) -> None:
        rank = PRIORITY["baseline" if p.proposer == "baseline" else p.rung]
        heapq.heappush(self.queue, (rank, next(self.counter), p))

    def _runnable(self, p: Pending) -> bool:
        return p.proposer == "baseline" or p.rung == "smoke" or run_fidelity(p.rung) in self.baselines

    def baseline_fidelities(self) -> list[str]:
        return [f for f in ("short", "full") if f in self.target.fidelities
                and LADDER.index(f) <= LADDER.index(self.settings.max_fidelity)]

    # --- proposals
    def _want_proposals(self) -> int:
        if self._budget_hit() or not self.policy.live_arms():
            return 0
        ready = sum(1 for *_, p in self.queue if p.rung == "smoke")
        return self.capacity + self.capacity // 2 + 1 - ready - len(self.futures)  # keep proposals ahead

    def _propose(self) -> None:
        for _ in range(max(0, self._want_proposals())):
            arm = self.policy.choose_arm()
            if arm is None:
                return
            parent = self._pick_parent(arm)
            if parent is None:
                self.policy.retire(arm)  # dry on every parent for now; new nodes bring it back
                continue
            ctx = self.candidates.context(parent, "; ".join(b.line() for b in self.baselines.values()))
            proposer = self.proposers[arm.split(":")[0]]
            if arm.startswith("llm:"):
                ctx.notes = ctx.notes + [f"model: {arm[4:]}"]
            self.futures[self.threads.submit(proposer.propose, ctx)] = (arm, parent)

    def _pick_parent(self, arm: str) -> str | None:
        nodes = self._nodes()
        parent, _why = self.policy.choose_parent(self.db.base_commit, nodes)
        dry = self.dry.get(arm, set())
        if parent not in dry:
            return parent
        ranked = [n.commit for n in sorted(nodes, key=lambda n: (-n.rung, n.score))] + [self.db.base_commit]
        return next((c for c in ranked if c not in dry), None)

    def _collect_proposals(self) -> None:
        for fut in [f for f in self.futures if f.done()]:
            arm, parent = self.futures.pop(fut)
            proposer = self.proposers[arm.split(":")[0]]
            try:
                proposal = fut.result()
            except Exception as e:  # a proposer bug must not end the search
                self.live.note(f"{arm} failed: {type(e).__name__}: {e}")
                if getattr(e, "fatal", False):
                    self.policy.retire(arm)
                    continue
                proposal = None
            if proposal is None:
                if arm == "ideas":  # the library has nothing more for this parent
                    self.dry.setdefault(arm, set()).add(parent)
                else:
                    self.none_streak[arm] = self.none_streak.get(arm, 0) + 1
                    if self.none_streak[arm] >= NONE_STREAK:
                        self.policy.retire(arm)
                        self.live.note(f"{arm}: {NONE_STREAK} proposals in a row failed; retired")
                continue
            self.none_streak[arm] = 0
            self.summary.dollars += proposal.cost.dollars
            changes, why = self.candidates.accept(proposal)
            if changes is None:
                self.live.note(f"rejected {proposal.title[:60]}: {why}")
                proposer.tell(proposal, None)
                continue
            self.push(Pending("", parent, "smoke", (0,), proposal.title, proposal.proposer, proposal.model,
                               proposal, arm, changes=changes))

    # --- runs
    def _dispatch(self) -> None:
        blocked = []
        while self.queue and len(self.inflight) < self.capacity:
            item = heapq.heappop(self.queue)
            p = item[2]
            if not self._runnable(p):
                blocked.append(item)
                continue
            if p.trial is None and p.proposer != "baseline":
                if self._budget_hit():
                    continue
                t0 = time.perf_counter()
                if p.changes is not None and not self._commit(p):
                    continue
                self.summary.trials += 1
                self.meter.charge(-1, t0)  # moved to the trial _start opens
            t0 = time.perf_counter()
            self.meter.charge(self._start(p), t0, self.meter.controller_s.pop(-1, 0.0))
        for item in blocked:
            heapq.heappush(self.queue, item)

    def _commit(self, p: Pending) -> bool:
        """Commit an accepted proposal right before its first trial, so every commit has a trial."""
        commit, why = self.candidates.commit(p.proposal, p.changes)
        if commit is None:
            self.live.note(f"rejected {p.title[:60]}: {why}")
            self.proposers[p.arm.split(":")[0]].tell(p.proposal, None)
            return False
        p.commit, p.changes = commit, None
        return True

    def _start(self, p: Pending) -> int:
        fid = run_fidelity(p.rung)
        if p.trial is None:
            attrs = {"seeds": list(p.seeds), "rung": p.rung}
            if p.proposal is not None:
                attrs.update(ideas=list(p.proposal.ideas), knobs=p.proposal.knobs,
                             llm_input_tokens=p.proposal.cost.input_tokens,
                             llm_output_tokens=p.proposal.cost.output_tokens, llm_dollars=p.proposal.cost.dollars)
            number = self.next_number
            self.next_number += 1
            self.recorder.call(self._record_start, number, p, attrs)
            self.open[number] = Open(number, p, set())
        else:
            number = p.trial
            self.open[number].pending.seeds += p.seeds
        band = self.baselines[fid].band if (fid in self.baselines and p.proposer != "baseline") else None
        for seed in p.seeds:
            spec = RunSpec(self.target, seed=seed, fidelity=fid, repo=self.db.repo_path, commit=p.commit, band=band,
                           run_id=f"t{number}-s{seed}-{p.commit[:8]}")
            self.inflight[self.pool.submit(spec)] = (number, seed)
            self.open[number].waiting.add(seed)
        self.live.started(number, p)
        return number

    def _collect_runs(self, timeout: float) -> None:
        t_wait = time.perf_counter()
        done = self.pool.wait(list(self.inflight), timeout=timeout)
        self.meter.waited += time.perf_counter() - t_wait
        for ref in done:
            t0 = time.perf_counter()
            number, seed = self.inflight.pop(ref)
            try:
                finished = self.pool.get(ref)
                result = finished.result
                self.meter.spans.append((finished.started, finished.ended, finished.worker))
                self.recorder.call(self._record_run, number, result, finished.log_text)
            except Exception as e:  # the worker died and Ray gave up retrying
                result = RunResult(Status.FAILED, reason=f"worker lost: {type(e).__name__}: {e}", seed=seed)
            self.summary.worker_hours += result.wall_s / 3600
            tr = self.open[number]
            tr.results[seed] = result
            tr.worker_s += result.wall_s
            tr.waiting.discard(seed)
            if not tr.waiting:
                self._finish(tr)
            self.meter.charge(number, t0)

    def _finish(self, tr: Open) -> None:
        p, runs = tr.pending, [tr.results[s] for s in sorted(tr.results)]
        fid = run_fidelity(p.rung)
        if p.proposer == "baseline":
            try:
                self.baselines[fid] = build_baseline(self.target, fid, runs)
                value, state = self.baselines[fid].value, "complete"
            except RuntimeError as e:
                self.open.pop(tr.number, None)
                self.recorder.call(self.db.finish_trial, tr.number, None, runs, {"reason": str(e)}, "fail")
                raise
            self.open.pop(tr.number, None)
            b = self.baselines[fid]
            attrs = {"baseline": b.band.to_dict(), "target_loss": b.target_loss, "worker_seconds": tr.worker_s}
            self.recorder.call(self.db.finish_trial, tr.number, value, runs, attrs, state)
            self.live.finished(tr.number, p, "ok", value, 1.0, self.baselines[fid].band.final_loss)
            return
        base = self.baselines.get(fid)
        ok = all(r.status == Status.OK for r in runs)
        measured = ok and base is not None and p.rung != "smoke"
        value = objective(self.target.objective, runs, base.target_loss) if measured else None
        if ok and p.rung == "smoke":
            value = math.inf  # smoke proves the candidate runs; it does not measure the objective
        speedup = base.speedup(value) if base and p.rung != "smoke" else 0.0
        worst = next((r for r in runs if r.status != Status.OK), None)
        state = "complete" if ok else ("pruned" if worst.status == Status.PRUNED else "fail")
        attrs = {"speedup": speedup, "worker_seconds": tr.worker_s,
                 "gpu_seconds": tr.worker_s * self.target.resources.gpus,
                 "reason": (worst.reason[:2000] if worst else ""), "status": worst.status.value if worst else "ok"}
        nxt = self.climb(p.commit, p.parent, p.rung, p.title, p.proposer, p.model, runs, value, pending=p,
                          attrs=attrs)
        if nxt is not None and nxt.extend:
            self.push(Pending(p.commit, p.parent, "confirm", nxt.seeds, p.title, p.proposer, p.model,
                               trial=tr.number))
            return  # the confirm trial stays open until the t-test answers
        self.open.pop(tr.number, None)
        self.recorder.call(self.db.finish_trial, tr.number, value, runs, attrs, state)
        if value is not None:
            self.values[(p.commit, p.rung)] = value
            if math.isfinite(value) and p.rung != "smoke":
                self.policy.exhausted -= set(self.dry)  # a new parent: dry arms may have something again
        self.candidates.record(Record(p.commit, p.parent, p.title, p.proposer, p.rung,
                                      worst.status.value if worst else "ok", value, speedup, attrs["reason"]))
        loss = runs[-1].final.val_loss if runs and runs[-1].final else None
        self.live.finished(tr.number, p, worst.status.value if worst else "ok", value, speedup, loss)
        self._update_best(p, speedup)

    def climb(self, commit, parent, rung, title, proposer, model, runs, value, pending=None, attrs=None,
               resumed=None):
        fid = run_fidelity(rung)
        base = self.baselines.get(fid)
        speedup = base.speedup(value) if base else 0.0
        target_loss = base.target_loss if base else math.inf
        nxt = next_rung(rung, self.settings.ladder, runs, speedup, self.settings.min_speedup, target_loss,
                        self.settings.seeds, self.settings.max_seeds)
        if attrs is not None and nxt.verdict:
            attrs["verdict"] = nxt.verdict
        if pending is not None and pending.arm and rung in ("smoke", "short"):
            if rung == "short" or nxt.rung is None:  # the bandit's reward: did it beat its parent at short?
                parent_value = self.values.get((parent, "short"))
                ref = parent_value if parent_value else (self.baselines["short"].value if "short" in self.baselines
                                                          else None)
                won = value is not None and ref is not None and value < ref
                self.policy.reward(pending.arm, won)
                self.recorder.call(self.db.set_state, STATE_KEY, self.policy.state())
                if pending.proposal is not None:
                    self.proposers[pending.arm.split(":")[0]].tell(pending.proposal, value, won)
        if nxt.rung and not nxt.extend:
            if resumed is not None and (commit, nxt.rung) in resumed:
                return nxt
            self.push(Pending(commit, parent, nxt.rung, nxt.seeds, title, proposer, model))
        return nxt

    def _update_best(self, p: Pending, speedup: float) -> None:
        rank = LADDER.index(p.rung)
        best_rank = LADDER.index(self.summary.best_rung) if self.summary.best_rung else -1
        if speedup > 1.0 and (rank > best_rank or (rank == best_rank and speedup > self.summary.best_speedup)):
            self.summary.best_commit, self.summary.best_title = p.commit, p.title
            self.summary.best_speedup, self.summary.best_rung = speedup, p.rung
            self.live.best(self.summary)

    def _nodes(self) -> list[Node]:
        nodes: dict[str, Node] = {}
        for (commit, rung), value in self.values.items():
            base = self.baselines.get(run_fidelity(rung))
            if rung == "smoke" or base is None or not math.isfinite(value):
                continue
            node = Node(commit, value / base.value, LADDER.index(rung))
            if commit not in nodes or node.rung > nodes[commit].rung:
                nodes[commit] = node
        return list(nodes.values())

    # --- budgets
    def _budget_hit(self) -> str:
        s = self.settings
        if s.budget_trials and self.summary.trials >= s.budget_trials:
            return "trials"
        if s.budget_minutes and time.time() - self.started >= s.budget_minutes * 60:
            return "minutes"
        if s.budget_dollars and self.summary.dollars >= s.budget_dollars:
            return "dollars"
        gpu_hours = self.summary.worker_hours * self.target.resources.gpus
        if s.budget_gpu_hours and gpu_hours >= s.budget_gpu_hours:
            return "gpu-hours"
        return ""

    def _idle(self) -> bool:
        """Nothing running, nothing being proposed, nothing that could start."""
        return not self.inflight and not self.futures and not any(self._runnable(p) for *_, p in self.queue)

    # --- main
    def run(self) -> Summary:
        restore(self)
        try:
            with self.live:
                while True:
                    t_iter = time.perf_counter()
                    self._collect_runs(timeout=0.02 if self.futures else 0.2)
                    self._dispatch()  # refill freed workers before anything slower
                    self._propose()
                    self._collect_proposals()
                    self._dispatch()
                    free = self.capacity - len(self.inflight)
                    self.meter.iteration(t_iter, free, free > 0 and not any(self._runnable(p) for *_, p in self.queue))
                    if self.recorder.error is not None:
                        self.recorder.flush()  # raises the failed write
                    hit = self._budget_hit()
                    if hit == "minutes":
                        self.summary.stopped_by = hit
                        break
                    if self._idle() and (hit or not self.policy.live_arms()):
                        self.summary.stopped_by = hit or "nothing left to propose"
                        break
                    self.live.tick(self)
        except KeyboardInterrupt:
            self.summary.stopped_by = "interrupted (Ctrl-C)"
        finally:
            self._stop()
        return self.summary

    def _stop(self) -> None:
        for ref in list(self.inflight):
            self.pool.cancel(ref)
        for number in list(self.open):
            self.recorder.call(self.db.mark_failed, number, INTERRUPTED)
        self.inflight.clear()
        self.open.clear()
        for fut in self.futures:
            fut.cancel()
        self.threads.shutdown(wait=False, cancel_futures=True)
        self.recorder.call(self.db.set_state, STATE_KEY, self.policy.state())
        try:
            self.recorder.flush()
        finally:
            self.recorder.close()

    # --- the recorder thread's side
    def _record_start(self, number: int, p: Pending, attrs: dict) -> None:
        got = self.db.start_trial(p.commit, p.parent, p.proposer, p.title, p.rung, attrs, model=p.model)
        if got != number:
            raise RuntimeError(f"the study numbered a new trial {got}, not {number}: is another controller "
                               "writing to this search?")

    def _record_run(self, number: int, result: RunResult, log_text: str) -> None:
        self.db.save_run(number, result, log_text=log_text)
        run_dir = Path(result.log).parent
        if run_dir.name.startswith(f"t{number}-") and run_dir.is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)  # the log now lives in the artifacts
