"""The running search's side of reviews: it is the folder's one writer while it runs.

Once a second (`tick`) it applies the reviews the page queued (on the recorder's thread, in order
with the search's other writes), refreshes which candidates are rejected (never a parent again:
`Candidates.rejected`) and the notes every prompt carries (`Candidates.notes`), and starts a replay
of every approved candidate not replayed since its approval. It reads the reviews only when they may
have changed (issue #8: no query on the loop's thread per tick or proposal): at the start, once one
of its applies is written, and every tick while another process holds the writer lock (that one may
write them at any moment); the approvals are looked at again after such a read and while a replay's
result is on its way to the study. A replay here is what `speedsearch replay` does (agent/replay.py):
fresh seeds drawn from the commit and the search's replay counter, each run beside a base run with
the same seed, recorded as a "replay" trial and its paired base trial; its runs go through the loop's
pool and queue like any other, so a replay never waits for the search to end, nor stops it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

from agent.candidates import read_notes
from agent.names import Rung, Who
from agent.recorder import record_start
from agent.replay import REPLAYS_KEY
from agent.trial import BASE, CANDIDATE, Trial
from env.evaluate import RunSpec
from runs_db import reviews as rv
from runs_db.pairs import budget_words, pair_up
from search_space import judge

if TYPE_CHECKING:
    from agent.loop import Search

EVERY_S = 1.0  # how often the desk looks at the queue and the approvals
FIDELITY = "full"


class Desk:
    def __init__(self, search: Search):
        self.s = search
        self.lock = rv.WriterLock(search.db.dir)  # held for the whole run; the page then only queues
        self.replaying: dict[str, Trial] = {}  # commit -> its replay, under way or not yet seen recorded
        self.finished: set[str] = set()  # replays whose results are on their way to the study
        self.next_at = 0.0
        self.k = 0  # the last replay number this desk took
        self.applying: list[Future] = []  # queued reviews handed to the recorder, not written yet
        self.stale = False  # the reviews may have changed since they were read
        self.pending_due = True  # the approvals are to be looked at (approved_pending)
        self._read_reviews()  # before the first proposal is asked for
        if not self.lock.held:
            search.live.note("another process holds this search's writer lock: reviews are not applied here")

    def close(self) -> None:
        self.lock.release()

    def _read_reviews(self) -> None:
        self.s.candidates.rejected = rv.rejected(self.s.db)
        self.s.candidates.notes = read_notes(self.s.db)
        self.pending_due = True

    def tick(self) -> None:
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + EVERY_S
        db = self.s.db
        if not self.lock.held:  # the page or a command held it for a moment as the search started: retry
            self.stale = True  # and whoever holds it may have written reviews since the last read
            self.lock.release()
            self.lock = rv.WriterLock(db.dir)
        if self.lock.held and rv.queued(db.dir):
            # the writer's thread: in order with the search's writes
            self.applying.append(self.s.recorder.call(rv.apply_queued, db))
        if any(f.done() for f in self.applying):  # written: read after it
            self.stale, self.applying = True, [f for f in self.applying if not f.done()]
        if self.stale:
            self.stale = False
            self._read_reviews()
        if not self.lock.held or FIDELITY not in self.s.baselines or self.s._budget_hit():
            return
        if not (self.pending_due or self.finished):
            return
        self.pending_due = False
        pending = rv.approved_pending(db)
        for commit in [c for c in self.finished if c not in pending]:  # its replay is recorded now
            self.finished.discard(commit)
            self.replaying.pop(commit, None)
        for commit in pending:
            if commit not in self.replaying and commit != db.base_commit:
                self._start(commit)

    # -- a replay's life
    def _start(self, commit: str) -> None:
        s, db = self.s, self.s.db
        self.k = k = max(self.k, int(db.get_state(REPLAYS_KEY, 0) or 0)) + 1  # its write may still be queued
        purpose = f"replay-{k}"
        seeds = tuple(judge.fresh_seeds(commit, purpose, 0, s.first_batch))  # as many pairs as confirm's first look
        title = db.message(commit).split("\n", 1)[0]
        t = Trial(commit, db.history.parent(commit) or "", title, Who.REPLAY, rung=Rung.CONFIRM, batch=seeds)
        s.recorder.call(db.set_state, REPLAYS_KEY, k)
        t.number, t.base_number = s._new_number(), s._new_number()
        s.recorder.call(record_start, db, t.number, commit, t.parent, Who.REPLAY, title, Rung.CONFIRM,
                        {"purpose": purpose, "seeds": list(seeds), "approved": True}, None)
        s.recorder.call(record_start, db, t.base_number, db.base_commit, "", Who.BASELINE,
                        f"baseline beside {purpose} (trial {t.number})", Rung.CONFIRM,
                        {"pairs_for": t.number, "purpose": purpose}, None)
        s.open[t.number] = t
        s.live.started(t.number, t)
        self.replaying[commit] = t
        t.expect(seeds, paired=True)
        for seed in seeds:  # pairs: the candidate and the base with the same seed, sent together when workers free
            s.send_later(t, [(t, role, seed, RunSpec(s.target, seed=seed, fidelity=FIDELITY, repo=db.repo_path,
                                                     commit=c, run_id=f"{purpose}-{role[0]}-s{seed}-{c[:8]}"))
                             for role, c in ((CANDIDATE, commit), (BASE, db.base_commit))])
        s.live.note(f"replaying approved {commit[:8]} ({purpose}, {len(seeds)} seeds beside the base)")

    def finish(self, t: Trial) -> None:
        """Every run of a replay is back: its one speed-up, recorded as `speedsearch replay` records it."""
        s, db = self.s, self.s.db
        s.open.pop(t.number, None)
        cand = sorted(t.runs.get(Rung.CONFIRM, []), key=lambda r: r.seed)
        base_runs = [t.paired[seed] for seed in sorted(t.paired)]
        base = s.baselines[FIDELITY]
        paired = pair_up(cand, base_runs)
        obs = paired.obs(base.kind, base.target_loss)
        sp = judge.speedup(base.kind, base.target_loss, obs, budget=budget_words(s.target, FIDELITY))
        gains, _ = judge.gains(base.kind, obs)
        attrs = {"speedup": sp.estimate, "speedup_text": sp.text(), "speedup_detail": sp.to_dict(),
                 "pvalue": judge.pvalue(gains) if len(gains) >= 2 else None,
                 "loss_pvalue": judge.speedrun_pvalue([r.final.val_loss for r in paired.candidate], base.target_loss),
                 "target_loss": base.target_loss, "trusted": paired.untrusted == 0, "approved": True,
                 "worker_seconds": t.worker_s, "gpu_seconds": t.worker_s * s.target.resources.ray_gpus}
        value = sum(c.value for c, _ in obs) / len(obs) if obs and len(paired.candidate) == len(cand) else None
        base_value = sum(b.value for _, b in obs) / len(obs) if obs else None
        s.recorder.call(db.finish_trial, t.number, value, cand, attrs, "complete" if value is not None else "fail")
        s.recorder.call(db.finish_trial, t.base_number, base_value, base_runs, {"pairs_for": t.number},
                        "complete" if base_value is not None else "fail")
        final = cand[-1].final if cand else None
        s.live.finished(t.number, t, "ok" if value is not None else "failed", final.val_loss if final else None,
                        sp.text())
        self.finished.add(t.commit)
