"""The cluster's faults, kept apart from the candidates': lost runs, sick nodes, a lost cluster.

A run lost with its worker or node (env.pool.RunLost) is the cluster's failure: the loop sends it
again, away from the node it was lost on, and the attempt is counted here (its worker-seconds, the
node, the error), in the study state `LOST_KEY` that `status` reads. A run of a target with
`[checkpoint]` continues from its last saved state rather than from zero (env/run_state.py: the
pool keeps it on the controller, by value, keyed by the run). A node where run after run is
lost or fails while the others succeed is quarantined: no run goes there any more. A cluster with
no node left that fits a run, or whose GCS is gone, pauses the search (`--resume` goes on).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `status` reads `summary_line` without loading Ray
    from env.pool import ClusterView, Pool, RunLost

LOST_KEY = "lost"  # study state: the lost attempts and quarantined nodes of the search
TRIES = 5  # a run lost this many times is given up as failed (a run that takes down every worker it meets)
# Lost runs, or failed runs of the base (a candidate's own failure says nothing of the node), in a
# row on one node while another node succeeds: quarantine.
SICK_AFTER = 3
CHECK_EVERY_S = 3.0  # how often the loop looks at the cluster (one TCP connect and one GCS call)
NO_NODE_GRACE_S = 15.0  # no node fits a run this long: the cluster is lost (a restarting node comes back sooner)
KEEP_ATTEMPTS = 50  # the last lost attempts kept in the state, with their errors


@dataclass
class NodeHealth:
    """Per node: runs in a row that were lost or failed, and whether another node did well since."""

    streak: dict[str, int] = field(default_factory=dict)
    others_ok: dict[str, bool] = field(default_factory=dict)

    def ok(self, node: str) -> None:
        self.streak[node] = 0
        for other in self.others_ok:
            if other != node:
                self.others_ok[other] = True

    def bad(self, node: str) -> bool:
        """One more bad run there; True when the node has earned its quarantine."""
        if not self.streak.get(node):
            self.others_ok[node] = False  # only a success elsewhere after its streak began counts
        self.streak[node] = self.streak.get(node, 0) + 1
        return self.streak[node] >= SICK_AFTER and self.others_ok.get(node, False)


class Faults:
    def __init__(self, pool: Pool, cpus: int, gpus: int):
        self.pool, self.cpus, self.gpus = pool, cpus, gpus
        self.health = NodeHealth()
        self.tries: dict[str, int] = {}  # run id -> lost attempts
        self.state: dict[str, Any] = {"runs": 0, "worker_s": 0.0, "retried": 0, "given_up": 0, "by_node": {},
                                      "quarantined": [], "attempts": []}
        self.checked = 0.0
        self.no_node_since: float | None = None
        self.lost_reason = ""  # set once the cluster is lost: the search pauses

    def restore(self, saved: dict[str, Any] | None) -> None:
        """A resumed search goes on counting; quarantined nodes stay out while they keep their id."""
        if isinstance(saved, dict):
            self.state.update({k: v for k, v in saved.items() if k in self.state})
            self.pool.quarantined.update(self.state["quarantined"])

    # --- runs
    def lost(self, number: int | None, lost: RunLost) -> str:
        """Count a lost attempt: "again" (send it again), "pause" (the cluster is gone: the search
        pauses, the run is interrupted) or "give up" (lost TRIES times: it fails)."""
        run_id = lost.spec.run_id if lost.spec is not None else ""
        self.tries[run_id] = self.tries.get(run_id, 0) + 1
        s = self.state
        s["runs"] += 1
        s["worker_s"] += lost.worker_s
        node = lost.node or "unknown"
        s["by_node"][node[:12]] = s["by_node"].get(node[:12], 0) + 1
        if not self.cluster_alive():
            what = "pause"
        else:
            what = "again" if lost.spec is not None and self.tries[run_id] < TRIES else "give up"
            s["retried" if what == "again" else "given_up"] += 1
        s["attempts"] = (s["attempts"] + [{"trial": number, "run": run_id, "node": node[:12], "at": lost.ended,
                                           "worker_s": round(lost.worker_s, 1), "error": str(lost)[:200],
                                           "then": what}])[-KEEP_ATTEMPTS:]
        return what

    def ran(self, node: str, ok: bool) -> str:
        """A run ended on `node` (ok: it ran to a result that was not a failure). Returns a note
        when the node is quarantined now."""
        if not node:
            return ""
        if ok:
            self.health.ok(node)
            return ""
        if not self.health.bad(node) or node in self.pool.quarantined:
            return ""
        if len(self._view().nodes) <= 1:  # never the last node that can run anything
            return ""
        self.pool.quarantined.add(node)
        self.state["quarantined"] = sorted(self.pool.quarantined)
        return (f"node {node[:12]} quarantined: {SICK_AFTER} runs in a row lost or failed there while other "
                f"nodes succeed; no more runs go to it")

    def snapshot(self) -> dict[str, Any]:
        """A copy for the recorder's thread (the loop goes on changing the state)."""
        return copy.deepcopy(self.state)

    # --- the cluster
    def cluster_alive(self) -> bool:
        why = self.pool.unreachable()
        self.lost_reason = self.lost_reason or why
        return not why

    def _view(self) -> ClusterView:
        return self.pool.view(self.cpus, self.gpus)

    def check(self, force: bool = False) -> int | None:
        """Every few seconds: the capacity the cluster has now (None when not looked at, or when
        the cluster is lost: `lost_reason` says so)."""
        now = time.time()
        if not force and now - self.checked < CHECK_EVERY_S:
            return None
        self.checked = now
        if not self.cluster_alive():
            return None
        view = self._view()
        if view.fits == 0:
            self.no_node_since = self.no_node_since or now
            if now - self.no_node_since >= NO_NODE_GRACE_S:
                size = f"{self.cpus} CPU" + (f", {self.gpus} GPU" if self.gpus else "")
                self.lost_reason = f"no alive node can take a run of {size} for {NO_NODE_GRACE_S:g} s"
            return None
        self.no_node_since = None
        return view.fits

    def paused_line(self) -> str:
        return f"paused: the Ray cluster was lost ({self.lost_reason}); resume with --resume"

    def summary_line(self) -> str:
        return summary_line(self.state)


def summary_line(state: dict[str, Any] | None) -> str:
    """One line for the summary and `status`; empty when nothing was lost."""
    if not isinstance(state, dict) or not (state.get("runs") or state.get("quarantined")):
        return ""
    line = (f"{state.get('runs', 0)} run(s) lost with their worker or node ({state.get('worker_s', 0) / 3600:.2f} "
            f"worker-hours), {state.get('retried', 0)} sent again; never counted as a candidate's failure")
    if state.get("given_up"):
        line += f"; {state['given_up']} given up"
    if state.get("quarantined"):
        line += f"; quarantined: {', '.join(n[:12] for n in state['quarantined'])}"
    return line
