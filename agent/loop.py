"""The search loop: scheduling only. Keep every worker busy, record results as they arrive.

Proposals (an LLM call takes tens of seconds) run ahead of evaluations in a thread pool. A started
batch's runs wait in `ready`, in priority order, and go to Ray only when a worker is free for them
(Ray would otherwise queue them first come, first served, and a second confirmation's pairs would
hold the workers that the first needs to finish); a pair (a candidate run and its base partner)
goes only when two workers are free, so its two runs share one window of the machine's load.
Each candidate is one `Trial` from proposal to verdict; what happens after a rung is decided in
`agent.ladder`, what each learner is told in `agent.reward`, and `agent.resume` rebuilds the
trials from the runs database after any crash.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor

from agent import ladder, reward
from agent.ahead import Ahead
from agent.baseline import Baselines, run_fidelity
from agent.candidates import Candidates, Record
from agent.committer import Committer
from agent.faults import LOST_KEY, TRIES, Faults
from agent.live import Live
from agent.meter import Meter, Summary
from agent.names import LADDER, Rung, Verdict, Who, rung_index
from agent.policy import STATE_KEY, Node, Policy
from agent.proposal import Proposer
from agent.recorder import Recorder, attach_view, record_run, record_rung, record_start
from agent.resume import FDR_KEY, INTERRUPTED, Restored, restore, rewards
from agent.review.desk import Desk
from agent.settings import SearchSettings
from agent.trial import BASE, CANDIDATE, Trial, rejected, whole_pairs
from env.evaluate import RunSpec
from env.pool import Pool, RunLost
from runs_db import dashboard
from runs_db.db import RunsDB
from search_space import judge
from search_space.errors import UserError
from search_space.records import RunResult, Status
from search_space.target import Target

PRIORITY = {Who.BASELINE: 0, Rung.CONFIRM: 1, Rung.FULL: 2, Rung.SHORT: 3, Rung.SMOKE: 4}
ADD_PAIRS = 2  # pairs added per confirm look while the test is unclear
LOST_PAIRS = 4  # confirm gives up after this many pairs it could not use (a failed baseline run, two nodes)


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
        # a candidate's rungs: those the target declares a fidelity for, smoke as SearchSettings.smoke says
        self.ladder = tuple(r for r in settings.ladder(target.resources.startup_s)
                            if r == Rung.CONFIRM or r in target.fidelities)
        if not self.ladder:
            raise UserError(f"--max-fidelity {settings.max_fidelity}: target {target.name} has no such fidelity "
                            f"(it has {', '.join(sorted(target.fidelities))})")
        self.live = live or Live(enabled=False)
        self.capacity = settings.workers or pool.capacity(target.resources.cpus, target.resources.ray_gpus)
        # lost runs, sick nodes, the cluster's size and its loss (agent/faults.py)
        self.faults = Faults(pool, target.resources.cpus, target.resources.ray_gpus)
        self.queue: list[tuple[int, int, Trial]] = []
        self.stranded: list[Trial] = []  # left waiting when the budget ran out (a resume takes them on)
        self.counter = itertools.count()
        self.inflight: dict = {}  # ObjectRef -> (trial, role, seed)
        # runs of started batches not yet sent: (key, n, group); a group is one run, or a pair sent together
        self.ready: list[tuple[tuple, int, list]] = []
        self.drain_noted = False
        self.open: dict[int, Trial] = {}  # study trial number -> its Trial, while a batch runs
        self.trials: dict[str, Trial] = {}  # commit -> candidate
        self.baselines = Baselines(target)
        self.fdr = judge.OnlineFDR(level=settings.fdr)
        self.summary = Summary()
        self.meter = Meter()
        self.started = time.time()
        self.recorder = Recorder()
        self.teller = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tell")  # see _tell
        self.told: collections.deque[Future] = collections.deque()
        attach_view(db, target)  # optuna-dashboard's view: one trial per candidate
        self.next_number = 0  # Optuna numbers trials 0, 1, 2, ... in the order this loop starts them
        self.ahead = Ahead(self.policy, proposers, self.candidates, self.live, max(2, min(8, self.capacity + 1)))
        self.committer = Committer(db)  # accepted proposals are committed on its thread, ahead of need

    @property
    def first_batch(self) -> int:
        """Confirm's first batch: the pairs the sequential test needs before it answers at all."""
        return max(self.settings.seeds, judge.MIN_PAIRS)

    # --- queue
    def push(self, t: Trial) -> None:
        heapq.heappush(self.queue, (PRIORITY[Who.BASELINE if t.is_baseline else t.rung], next(self.counter), t))

    def _runnable(self, t: Trial) -> bool:
        return t.is_baseline or t.rung == Rung.SMOKE or run_fidelity(t.rung) in self.baselines

    def baseline_fidelities(self) -> list[str]:
        return [f for f in ("short", "full") if f in self.target.fidelities
                and LADDER.index(f) <= LADDER.index(self.settings.max_fidelity)]

    def _measure_base(self, fid: str, n: int) -> None:
        self.push(Trial(self.db.base_commit, "", "baseline", Who.BASELINE, rung=fid,
                        batch=self.baselines.seeds(fid, n)))

    # --- proposals
    def _want_proposals(self) -> int:
        if self._budget_hit() or not self.policy.live_arms():
            return 0
        ready = sum(1 for *_, t in self.queue if t.rung == self.ladder[0] and not t.is_baseline)
        return (self.capacity + self.capacity // 2 + 1 - ready - len(self.ahead.futures)  # keep proposals ahead
                - self.committer.pending)

    def _propose(self) -> None:
        self.ahead.ask(self._want_proposals(), self.db.base_commit, self._nodes(), self.baselines.line())

    def _proposer(self, arm_or_who: str) -> Proposer:
        return self.ahead.proposer(arm_or_who)

    def _tell(self, arm_or_who: str, proposal, outcome) -> None:
        """Tell a proposer, on the one `tell` thread (in order): a proposer's tell can wait on its
        own lock while a proposal thread asks it for the next one (the knobs sampler's Optuna ask),
        and the main thread must not, or finished runs wait to be picked up (bench/loop.py)."""
        self.told.append(self.teller.submit(self._proposer(arm_or_who).tell, proposal, outcome))

    def _told(self, wait: bool = False) -> None:
        """Surface a failed tell (a proposer's bug ends the search, as it did when told inline)."""
        while self.told and (wait or self.told[0].done()):
            self.told.popleft().result()

    def _collect_proposals(self) -> None:
        for arm, parent, proposal in self.ahead.collect():
            self.summary.dollars += proposal.cost.dollars
            changes, why = self.candidates.accept(proposal)
            if changes is None and self._adopt(arm, proposal):
                continue
            if changes is None:
                self.ahead.rejected(arm, why)
                self.live.note(f"rejected {proposal.title[:60]}: {why}")
                self._tell(arm, proposal, rejected(proposal, why))
                continue
            self.committer.submit(Trial("", parent, proposal.title, proposal.proposer, proposal.model, arm, proposal,
                                        changes, rung=self.ladder[0]))
        for t, written in self.committer.collect():  # committed on the committer's thread, in order
            commit, why = self.candidates.committed(t.proposal, t.changes, written)
            if commit is None:
                self.ahead.rejected(t.arm or t.who, why)
                self.live.note(f"rejected {t.title[:60]}: {why}")
                self._tell(t.who, t.proposal, rejected(t.proposal, why))
                continue
            t.commit, t.changes = commit, None
            self.push(t)

    def _adopt(self, arm: str, proposal) -> bool:
        """A proposal whose twin is a commit a crash left before any trial (a resume runs it at smoke,
        knowing no proposal): the proposal becomes that candidate's, so its proposer hears how it did
        instead of "already tried"."""
        twin = self.trials.get(proposal.meta.get("twin", ""))
        if twin is None or twin.proposal is not None or twin.is_baseline or twin.who != proposal.proposer:
            return False
        if twin.ended:
            self._tell(arm, proposal, twin.outcome(final=True))
        else:
            twin.proposal, twin.arm = proposal, twin.arm or arm
        return True

    # --- runs
    def _dispatch(self) -> None:
        """Fill free workers: ready runs first (in priority order), a queued trial's batch is started
        only when it outranks them. A pair waits at the head until two workers are free (strict
        order: nothing of lower priority overtakes it). Past the minutes budget only confirmations
        run (the drain)."""
        if self.faults.lost_reason:  # nothing goes to a lost cluster (the search pauses)
            return
        blocked = []
        draining = self._budget_hit() == "minutes"
        while len(self.inflight) < self.capacity:
            if self.ready and (not self.queue or self.ready[0][0][0] <= self.queue[0][0]):
                group = self.ready[0][2]
                if draining and (group[0][0].is_baseline or group[0][0].rung != Rung.CONFIRM):
                    heapq.heappop(self.ready)  # its trial stays open: marked interrupted at the stop
                    continue
                if self.capacity - len(self.inflight) < min(len(group), self.capacity):
                    break
                heapq.heappop(self.ready)
                for t, role, seed, spec in group:
                    ref = self.pool.submit(spec)
                    self.inflight[ref] = (t, role, seed)
                    self.meter.sent[ref] = time.time()
                continue
            if not self.queue:
                break
            item = heapq.heappop(self.queue)
            t = item[2]
            if not self._runnable(t):
                blocked.append(item)
                continue
            if draining and t.is_baseline:  # a refresh helps no confirmation now
                continue
            t0 = time.perf_counter()
            new_trial = not t.is_baseline and t.number is None
            if new_trial and self._budget_hit():  # a new study trial is what the budget counts
                self.stranded.append(t)
                continue
            if new_trial:
                self.trials[t.commit] = t
                self.summary.trials += 1
                self.candidates.unrecorded.discard(t.commit)  # its study trial is recorded next (_start)
            self.meter.charge(self._start(t), t0)
        for item in blocked:
            heapq.heappush(self.queue, item)

    def _screen_paired(self, t: Trial) -> bool:
        """Does this screening rung run beside a base partner? (agent.ladder.screen_paired)"""
        fid = run_fidelity(t.rung)
        return (not t.is_baseline and t.rung in (Rung.SHORT, Rung.FULL) and fid in self.baselines
                and ladder.screen_paired(self.baselines.spread(fid), self.capacity, self.target.resources.pack > 1))

    def _new_number(self) -> int:
        n, self.next_number = self.next_number, self.next_number + 1
        return n

    def _start(self, t: Trial) -> int:
        """Open the batch's study trial(s) and put its runs in `ready`; `_dispatch` sends them."""
        fid = run_fidelity(t.rung)
        if t.number is None:  # a new rung: a new study trial (paired: two, the candidate's and its baseline's)
            t.base_number = None
            paired = t.rung == Rung.CONFIRM or self._screen_paired(t)
            attrs = {"seeds": list(t.batch), "rung": t.rung}
            if t.arm:
                attrs["arm"] = t.arm
            if t.proposal is not None and not t.numbers:  # its first rung: what resume rebuilds it from
                p = t.proposal
                attrs.update(ideas=list(p.ideas), knobs=p.knobs, knob_trial=p.meta.get("knob_trial"),
                             llm_input_tokens=p.cost.input_tokens, llm_output_tokens=p.cost.output_tokens,
                             llm_dollars=p.cost.dollars)
            if t.rung == Rung.CONFIRM:
                if t.alpha is None:  # the level is fixed when the candidate starts confirming
                    t.alpha = self.fdr.next_alpha()
                    self.recorder.call(self.db.set_state, FDR_KEY, self.fdr.to_dict())
                attrs.update(alpha=t.alpha, fdr=self.fdr.guarantee)
            t.number = self._new_number()
            t.numbers[t.rung] = t.number
            self.recorder.call(record_start, self.db, t.number, t.commit, t.parent, t.who, t.title, t.rung, attrs,
                               t.model)
            if paired:
                t.base_number = self._new_number()
                self.recorder.call(record_start, self.db, t.base_number, self.db.base_commit, "", Who.BASELINE,
                                   f"baseline beside trial {t.number}", t.rung, {"pairs_for": t.number}, None)
            self.open[t.number] = t
            self.live.started(t.number, t)
        paired = t.base_number is not None
        t.expect(t.batch, paired)
        carried, t.carried = t.carried, {}  # finished before a stop or crash (agent/resume.py): not run again
        if paired:  # a pair is carried whole or run again whole: its two runs are compared as side by side
            carried = whole_pairs(carried)
        # Single-seed rungs are pruned against the baseline band; a pair runs whole, both sides alike.
        band = self.baselines[fid].band if (fid in self.baselines and not t.is_baseline and not paired) else None
        for seed in t.batch:  # a pair: the candidate and the base with the same seed, sent together
            group = []
            for role, commit in ((CANDIDATE, t.commit), (BASE, self.db.base_commit))[: 2 if paired else 1]:
                if (role, seed) in carried:
                    continue
                spec = RunSpec(self.target, seed=seed, fidelity=fid, repo=self.db.repo_path, commit=commit,
                               band=band, run_id=f"t{t.number}-{role[0]}-s{seed}-{commit[:8]}",
                               fills_cache=commit == self.db.base_commit)
                group.append((t, role, seed, spec))
            if group:
                self.send_later(t, group)
        for (role, seed), result in carried.items():
            if (role, seed) in t.waiting:
                self.recorder.call(record_run, self.db, t.number if role == CANDIDATE else t.base_number, result, None)
                self._add(t, role, seed, result)
        return t.number

    def send_later(self, t: Trial, group: list) -> None:
        """Queue one run, or a pair [(trial, role, seed, RunSpec), ...] sent together, for `_dispatch`
        (the review desk's replays too). Ready runs go in the order baseline, confirm (a replay with
        them), full, short, smoke; within a rung the trial started first: a confirmation's later
        looks keep its number, so it finishes before another's starts."""
        rung = Rung.CONFIRM if t.who == Who.REPLAY else t.rung
        heapq.heappush(self.ready, ((PRIORITY[Who.BASELINE if t.is_baseline else rung], t.number),
                                    next(self.counter), group))

    def _collect_runs(self, timeout: float) -> None:
        t_wait = time.perf_counter()
        done = self.pool.wait(list(self.inflight), timeout=timeout)
        self.meter.waited += time.perf_counter() - t_wait
        for ref in done:
            t0 = time.perf_counter()
            t, role, seed = self.inflight.pop(ref)
            number = t.number if role == CANDIDATE else t.base_number
            try:
                finished = self.pool.get(ref)
                result = finished.result
                result.provenance.setdefault("worker", finished.worker)
                self.meter.spans.append((finished.started, finished.ended, finished.worker))
                self.meter.handed(self.meter.sent.pop(ref, None), finished.started, finished.ended)
                if result.final is not None:  # the trainer's own active time, for bench/loop.py
                    self.meter.active.append((finished.ended, result.final.train_ms / 1000))
                self.recorder.call(record_run, self.db, number, result, finished.log_text)
                # The node's health: a candidate's own failure says nothing of it, the base's does.
                if result.status == Status.OK or t.is_baseline or role == BASE:
                    self._note(self.faults.ran(finished.node, result.status in (Status.OK, Status.PRUNED)))
            except RunLost as lost:  # the cluster's failure, never the candidate's: sent again
                result = self._lost((t, role, seed), number, lost)
                if result is None:
                    self.meter.charge(number, t0)
                    continue
            except Exception as e:  # the task itself raised: a bug, not a lost worker
                result = RunResult(Status.FAILED, reason=f"the run's task raised {type(e).__name__}: {e}", seed=seed)
            self.summary.worker_hours += result.wall_s / 3600
            self._add(t, role, seed, result)
            self.meter.charge(number, t0)

    def _add(self, t: Trial, role: str, seed: int, result: RunResult) -> None:
        """One run's result into its trial; a complete batch is judged at once."""
        if t.add_run(role, seed, result):
            if t.is_baseline:
                self._finish_baseline(t)
            elif t.who == Who.REPLAY:  # an approved candidate's replay (agent/review/desk.py)
                self.desk.finish(t)
            elif t.rung == Rung.CONFIRM:
                self._finish_confirm(t)
            else:
                self._finish_rung(t)

    def _lost(self, run: tuple, number: int | None, lost: RunLost) -> RunResult | None:
        """A lost run: sent again away from its node (None), left for the pause when the cluster is
        gone (None: its trial is marked interrupted), or failed after being lost TRIES times."""
        what = self.faults.lost(number, lost)
        self.summary.worker_hours += lost.worker_s / 3600  # spent, though on no result
        self.recorder.call(self.db.set_state, LOST_KEY, self.faults.snapshot())
        self._note(self.faults.ran(lost.node, False))
        if what == "again":
            self.inflight[self.pool.submit(lost.spec, avoid=lost.node)] = run
            return None
        if what == "pause":
            return None
        return RunResult(Status.FAILED, seed=run[2], reason=f"its run was lost {TRIES} times, the last: {lost}")

    def _note(self, text: str) -> None:
        if text:
            self.live.note(text)
            self.recorder.call(self.db.set_state, LOST_KEY, self.faults.snapshot())

    def _watch_cluster(self) -> bool:
        """Capacity follows the cluster (unless --workers fixed it); False when the cluster is lost."""
        fits = self.faults.check()
        if self.faults.lost_reason:
            return False
        if fits is not None and fits != self.capacity and not self.settings.workers:
            self.live.note(f"the cluster fits {fits} run(s) at once now (was {self.capacity})")
            self.capacity = fits
        return True

    # --- what a finished batch means
    def _finish_baseline(self, t: Trial) -> None:
        fid, runs = t.rung, t.batch_runs()
        self.open.pop(t.number, None)
        try:
            b = self.baselines.add(fid, runs)
        except RuntimeError as e:
            self.recorder.call(self.db.finish_trial, t.number, None, runs, {"reason": str(e)}, "fail")
            if fid not in self.baselines:
                raise  # nothing can be judged without it
            self.live.note(f"a baseline refresh at {fid} failed: {e}")
            return
        attrs = {"baseline": b.band.to_dict(), "target_loss": b.target_loss, "worker_seconds": t.worker_s}
        self.recorder.call(self.db.finish_trial, t.number, b.value, runs, attrs, "complete")
        self.live.finished(t.number, t, "ok", runs[-1].final.val_loss if runs[-1].final else None, b.line())

    def _finish_rung(self, t: Trial) -> None:
        runs, fid = t.batch_runs(), run_fidelity(t.rung)
        worst = t.worst(runs)
        t.status, t.reason = (worst.status.value, worst.reason[:2000]) if worst else ("ok", "")
        won_rung, sp = False, None
        partner = self._finish_partner(t, fid)
        if worst is None and t.rung != Rung.SMOKE:
            base = self.baselines[fid]
            obs = judge.run_objective(base.kind, runs[0].curve, base.target_loss)
            versus, base_obs = f"mean of {base.runs} runs, 1 seed, unconfirmed", base.obs
            p_obs = (judge.run_objective(base.kind, partner.curve, base.target_loss)
                     if partner is not None and partner.status == Status.OK else None)
            if p_obs is not None and not p_obs.censored:  # screened beside its own base run (a busy machine)
                versus, base_obs = "its base run side by side, 1 seed, unconfirmed", p_obs
            if obs is not None:
                sp = judge.speedup(base.kind, base.target_loss, [(obs, base_obs)], versus=versus)
                t.values[t.rung], t.scores[t.rung] = obs.value, judge.score(obs.value, base_obs.value)
                t.speedup, t.speedup_text = sp.to_dict(), sp.text()
                won_rung = ladder.beats(sp, ladder.screen_bar(t.rung, self.settings.min_speedup,
                                                              base_obs is p_obs))
            if t.base_number is None and self.baselines.count(fid):  # re-measure the base, interleaved
                self._measure_base(fid, 1)
            if t.proposal is not None:
                self._tell(t.who, t.proposal, t.outcome())
        trusted = all(getattr(r, "trust", "trusted") == "trusted" for r in runs)
        step = ladder.after_rung(t.rung, self.ladder, worst is None, won_rung, trusted=trusted,
                                 allow_untrusted=self.settings.allow_untrusted, first_batch=self.first_batch)
        state = "complete" if worst is None else ("pruned" if worst.status == Status.PRUNED else "fail")
        value = t.values.get(t.rung) if t.rung != Rung.SMOKE else (float("inf") if worst is None else None)
        attrs = t.attrs(sp, step.rung, trusted, self.target.resources.ray_gpus)  # packed: a share of the GPU
        self._close(t, step, value, runs, attrs, state)

    def _finish_partner(self, t: Trial, fid: str) -> RunResult | None:
        """A screening rung's base partner: it re-measures the base, and its study trial ends."""
        if t.base_number is None:
            return None
        partner = next(iter(t.paired.values()), None)
        if partner is not None and partner.status == Status.OK:
            self.baselines.add(fid, [partner])
        obs = (judge.run_objective(self.baselines[fid].kind, partner.curve, self.baselines[fid].target_loss)
               if partner is not None and partner.status == Status.OK else None)
        self.recorder.call(self.db.finish_trial, t.base_number, obs.value if obs else None,
                           [partner] if partner else [], {"pairs_for": t.number}, "complete" if obs else "fail")
        return partner

    def _finish_confirm(self, t: Trial) -> None:
        runs = t.runs.get(Rung.CONFIRM, [])
        base = self.baselines["full"]
        self.baselines.add("full", [t.paired[s] for s in t.batch if s in t.paired])  # they re-measure the base
        worst = t.worst(runs)
        pairs, lost = ladder.confirm_pairs(runs, t.paired, base.kind, base.target_loss, t.confirm_order())
        if worst is not None:
            step = ladder.Step(None, verdict=Verdict.FAIL)  # a seed that crashes is not a speed-up
            t.status, t.reason = worst.status.value, worst.reason[:2000]
        elif lost > LOST_PAIRS:
            step = ladder.Step(None, verdict=Verdict.FAIL)
            t.reason = f"{lost} pairs could not be used (a failed baseline run, or the two on different nodes)"
        else:
            step = ladder.after_confirm(base.kind, pairs, t.alpha, self.settings.max_seeds, ADD_PAIRS)
        # the target's guards (search_space/guard.py) may veto a pass: a guard that dropped names itself
        held, why, guards = judge.hold_guards(step.verdict, self.target.guards, runs, t.paired)
        if held != step.verdict:
            step, t.reason = ladder.Step(None, verdict=Verdict.FAIL), why
        sp = judge.speedup(base.kind, base.target_loss, pairs) if pairs else None
        if sp is not None:
            t.speedup, t.speedup_text = sp.to_dict(), sp.text()
        if step.rung == Rung.CONFIRM:  # more pairs in the same study trials, ahead of later confirmations
            t.batch = tuple(judge.fresh_seeds(t.commit, "confirm", len(t.paired), step.seeds))
            self._start(t)
            return
        self.fdr.record(step.verdict == Verdict.PASS)
        self.recorder.call(self.db.set_state, FDR_KEY, self.fdr.to_dict())
        value = sum(c.value for c, _ in pairs) / len(pairs) if pairs else None
        attrs = {**t.attrs(sp, step.rung, True, self.target.resources.ray_gpus), "alpha": t.alpha,
                 "fdr": self.fdr.guarantee, "pairs": len(pairs), "guards": [g.to_dict() for g in guards]}
        base_runs = [t.paired[s] for s in sorted(t.paired)]
        base_value = sum(b.value for _, b in pairs) / len(pairs) if pairs else None
        self.recorder.call(self.db.finish_trial, t.base_number, base_value, base_runs, {"pairs_for": t.number},
                           "complete" if base_value is not None else "fail")
        self._close(t, step, value, runs, attrs, "complete" if value is not None and worst is None else "fail")

    def _close(self, t: Trial, step: ladder.Step, value, runs: list[RunResult], attrs: dict, state: str) -> None:
        """Record the rung, then queue the next one or end the candidate."""
        number = t.number
        self.open.pop(number, None)
        rung = t.rung
        if step.rung is None:
            self._end(t, step.verdict, attrs)
        self.recorder.call(record_rung, self.db, number, value, runs, attrs, state)
        self.candidates.record(Record(t.commit, t.parent, t.title, t.who, rung, t.status, value,
                                      attrs["speedup"], t.reason))
        loss = runs[-1].final.val_loss if runs and runs[-1].final else None
        self.live.finished(number, t, t.status, loss, t.speedup_text if rung != Rung.SMOKE else "")
        if rung in (Rung.SHORT, Rung.FULL) and t.scores.get(rung, 2.0) < 1.0:
            self.ahead.new_parent()
        if t.rung != Rung.CONFIRM:  # a screening partner is not one of confirm's pairs
            t.paired, t.base_number = {}, None
        if step.rung is not None:
            t.rung, t.number, t.worker_s = step.rung, None, 0.0
            t.batch = (tuple(judge.fresh_seeds(t.commit, "confirm", 0, step.seeds)) if step.rung == Rung.CONFIRM
                       else (0,))
            self.push(t)

    def _end(self, t: Trial, verdict: str, attrs: dict) -> None:
        """The candidate leaves the ladder: its verdict, and every learner's final word."""
        parent = self.trials.get(t.parent)
        parent_scores = reward.BASE_SCORES if t.parent == self.db.base_commit else (parent.scores if parent else {})
        t.end(verdict, reward.improved(t.scores, parent_scores, verdict))
        attrs.update(verdict=t.verdict, won=t.won)
        if t.arm:
            self.policy.reward(t.arm, t.won)
            self.recorder.call(self.db.set_state, STATE_KEY, self.policy.state())
        if t.proposal is not None:
            self._tell(t.who, t.proposal, t.outcome(final=True))
        if verdict == Verdict.PASS and self.summary.confirm(t):
            self.live.best(self.summary)
        elif verdict == Verdict.FAIL:
            self.summary.rejected += 1

    def _nodes(self) -> list[Node]:
        return [Node(c, t.scores[t.highest], rung_index(t.highest)) for c, t in self.trials.items() if t.highest
                and c not in self.candidates.rejected]  # a reviewer's reject: never a parent

    # --- budgets
    def _budget_hit(self) -> str:
        s = self.settings
        if s.budget_trials and self.summary.trials >= s.budget_trials:
            return "trials"
        if s.budget_minutes and time.time() - self.started >= s.budget_minutes * 60:
            return "minutes"
        if s.budget_dollars and self.summary.dollars >= s.budget_dollars:
            return "dollars"
        gpu_hours = self.summary.worker_hours * self.target.resources.ray_gpus  # packed runs share a GPU
        if s.budget_gpu_hours and gpu_hours >= s.budget_gpu_hours:
            return "gpu-hours"
        return ""

    def _draining(self) -> bool:
        """Past the minutes budget: go on only while a confirmation already under way can finish
        within `drain_minutes` (nothing new starts: `_dispatch` strands new trials at the budget)."""
        over_s = time.time() - self.started - self.settings.budget_minutes * 60
        under_way = [*self.open.values(), *(t for *_, t in self.queue)]
        # started ones only: a candidate queued for confirm but not started never starts now (stranded)
        confirming = {t.commit for t in under_way if t.rung == Rung.CONFIRM and not t.is_baseline
                      and t.number is not None}
        if not confirming or over_s >= self.settings.drain_minutes * 60:
            if confirming:  # say so: they end INTERRUPTED, and a --resume runs them again
                self.live.note(f"minutes budget reached: {len(confirming)} confirmation(s) under way cut off "
                               f"(drain {self.settings.drain_minutes:g} min); --resume finishes them")
            return False
        if not self.drain_noted:
            self.drain_noted = True
            self.live.note(f"minutes budget reached: finishing {len(confirming)} confirmation(s) under way, "
                           f"for up to {self.settings.drain_minutes:g} min more")
        return True

    def _idle(self) -> bool:
        """Nothing running, nothing being proposed, nothing that could start."""
        return (not self.inflight and not self.ahead.futures and not self.ready and not self.committer.pending
                and not any(self._runnable(t) for *_, t in self.queue))

    def _why_free(self) -> str:
        """Why a worker is free now, for bench/loop.py: "lag" (something runnable waits: the loop is
        behind), "pair" (a pair waits for a second free worker), "baseline" (candidates wait for the
        base's numbers), "commits" (accepted, on the committer's thread), "proposals" (asked, not back
        yet), "budget" (nothing new may start), "nothing"."""
        if self.ready:
            return "pair" if len(self.ready[0][2]) > self.capacity - len(self.inflight) else "lag"
        if any(self._runnable(t) for *_, t in self.queue):
            return "budget" if self._budget_hit() else "lag"
        if self.queue:
            return "baseline"
        if self.committer.pending:
            return "commits"
        if self.ahead.futures:
            return "proposals"
        return "budget" if self._budget_hit() else "nothing"

    # --- main
    def resume(self, r: Restored) -> None:
        """Take over what the runs database holds (a new search: nothing)."""
        self.next_number, self.summary.trials = r.next_number, r.candidates
        self.baselines.restore(r.base_runs, r.target_loss, r.base_seed)
        if r.fdr:
            self.fdr = judge.OnlineFDR.from_dict(r.fdr)
        self.summary.guarantee = self.fdr.guarantee
        self.faults.restore(self.db.get_state(LOST_KEY, None))
        n_seeds = max(self.settings.seeds, min(self.settings.max_seeds, self.capacity // 2))
        for fid in self.baseline_fidelities():
            if fid not in self.baselines:  # workers that would idle for the baseline measure it with more seeds
                self._measure_base(fid, n_seeds)
        for rec in r.records:
            self.candidates.record(rec)
        for t in r.ended + r.continuing:
            self.trials[t.commit] = t
        self.policy.rebuild(rewards(r.ended))
        for t in r.ended:  # every learner hears every ended candidate again: they rebuild what they knew
            if t.proposal is not None and t.who in self.proposers:
                self._proposer(t.who).tell(t.proposal, t.outcome(final=True))
            if t.verdict == Verdict.PASS:
                self.summary.confirm(t)
            self.summary.rejected += t.verdict == Verdict.FAIL
        for t in r.continuing:  # and what stands of those still climbing (the idea library: never again there)
            if t.proposal is not None and t.who in self.proposers:
                self._proposer(t.who).tell(t.proposal, t.outcome())
            if not t.numbers:  # committed, never started: at this ladder's first rung
                t.rung = self.ladder[0]
            self.push(t)
        settle = getattr(self.proposers.get(Who.KNOBS), "settle", None)
        if settle:
            settle({t.proposal.meta["knob_trial"] for t in r.continuing
                    if t.proposal is not None and "knob_trial" in t.proposal.meta})

    def run(self) -> Summary:
        self.db.check_schema()
        self.resume(restore(self.db, self.baseline_fidelities(), self.first_batch))
        self.desk = Desk(self)  # the folder's writer: applies the review page's requests, replays approvals
        try:
            with self.live:
                while True:
                    t_iter = time.perf_counter()
                    self._collect_runs(timeout=0.02 if self.ahead.futures or self.committer.pending else 0.2)
                    self._dispatch()  # refill freed workers before anything slower
                    self.desk.tick()  # before proposing: a reject made a second ago already counts
                    self._propose()
                    self._collect_proposals()
                    self._dispatch()
                    self.meter.iteration(t_iter, self.capacity - len(self.inflight), self._why_free())
                    self._told()
                    if self.recorder.error is not None:
                        self.recorder.flush()  # raises the failed write
                    if not self._watch_cluster():
                        self.summary.stopped_by = self.faults.paused_line()
                        break
                    hit = self._budget_hit()
                    if hit and self.meter.budget_at is None:
                        self.meter.budget_at = time.time()
                    if hit == "minutes" and not self._draining():
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
        self.summary.guarantee = self.fdr.guarantee
        self.live.note(self.summary.verdict_line())
        return self.summary

    def _stop(self) -> None:
        if not self.faults.lost_reason:  # a lost cluster has no runs left to stop, and no one to ask
            self.pool.stop(list(self.inflight))
        for t in {id(t): t for t in self.open.values()}.values():  # resumed later from where they stood
            for number in (t.number, t.base_number):
                if number is not None:
                    self.recorder.call(self.db.mark_failed, number, INTERRUPTED)
        told_error = None
        try:
            self._told(wait=True)  # the tells under way first, in order, then the last words below
        except Exception as e:  # raised once everything below is closed
            told_error = e
        self.teller.shutdown(wait=True)
        late = []  # committed (or not) after the last pickup: never started, their proposers hear below
        for t, written in self.committer.collect(wait=True):
            if written is not None:
                self.candidates.committed(t.proposal, t.changes, written)
            late.append(t)
        waiting = {id(t): t for t in [t for *_, t in self.queue] + self.stranded + late}
        running = {id(t): t for t in self.open.values()}
        for key, t in {**running, **waiting}.items():  # their proposers hear now, so none is left waiting
            if t.proposal is None or t.ended:  # (a resume runs them on, learners rebuild)
                continue
            if t.who == Who.KNOBS and t.highest and t.scores.get(t.highest) is not None:
                # the sampler is told once: the score at the highest rung measured so far, not a FAIL
                self._proposer(t.who).tell(t.proposal, t.outcome(final=True))
            elif key in waiting:
                self._proposer(t.who).tell(t.proposal, rejected(t.proposal, "the search stopped first"))
        self.inflight.clear()
        self.ready.clear()
        self.open.clear()
        self.ahead.stop()
        # a candidate branch is a commit some study trial names: those made ahead and never started go
        # (one left behind is harmless: a resume runs it at smoke)
        self.committer.close(discard=self.candidates.unrecorded)
        self.desk.close()
        self.recorder.call(self.db.set_state, STATE_KEY, self.policy.state())
        try:
            self.recorder.flush()
        finally:
            self.recorder.close()
            dashboard.finish(self.db)  # the candidates' plots still being drawn
        if told_error is not None:
            raise told_error
