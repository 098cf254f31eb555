"""The pool: one Ray task per run, with the GPUs and CPUs the target asks for.

A local `ray.init()` by default, an address for a cluster, logical GPUs in tests. Ray never
retries a run (`max_retries=0`): a run lost with its worker or node raises `RunLost` from `get`,
and the loop records the lost attempt and runs it again, elsewhere when it can (a lost run is the
cluster's failure, never the candidate's). A failing trainer is not lost: evaluate returns, never
raises. A target with `[checkpoint]` sends its runs' states back to a store on the controller's
node (env/run_state.py), so a run sent again (or run again by a resumed search) continues from its
last one; the state is dropped once the run's result is in. `view` says what the cluster can run
now (nodes join and leave, the GCS may be gone).
Compile caches are the machine's (env/cache_layer.py): filled by the base's runs, read by the
candidates' through an overlay, so a candidate that keeps the graph does not pay for compilation
again and none can plant a kernel for another run.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import ray
from ray import exceptions as rx
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, NodeLabelSchedulingStrategy, NotIn

from env.continuation import Continuation
from env.evaluate import RunSpec, evaluate, make_sandbox
from env.process_sandbox import MULTICAST_OFF
from env.run_state import RunStateStore, state_key
from env.source import run_root_here, ship
from search_space.records import RunResult
from search_space.target import cache_dir

LOG_CHARS = 4_000_000  # the log travels back with the result, so artifacts work across nodes
NODE_LABEL = "ray.io/node-id"  # every node's own label: how a run is kept off a node
# A run that ended with one of these was lost with its worker, its node or the cluster: not the
# candidate's doing. (A trainer that fails makes evaluate return a failed result, never raise.)
LOST = (rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError, rx.RayActorError,
        rx.ActorUnavailableError, rx.RaySystemError, rx.ObjectLostError, rx.ObjectFetchTimedOutError,
        rx.TaskUnschedulableError)


class RunLost(Exception):
    """A run that never finished because its worker, node or cluster went away."""

    def __init__(self, spec: RunSpec, node: str, started: float, error: BaseException):
        super().__init__(f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}")
        self.spec, self.node, self.started, self.error = spec, node, started, error
        self.ended = time.time()

    @property
    def worker_s(self) -> float:
        return max(0.0, self.ended - self.started)


@dataclass
class ClusterView:
    """What the cluster offers now: `reachable` False when its GCS is gone (nothing else is known then)."""

    reachable: bool
    fits: int = 0  # runs of the asked size that fit at once on the alive, unquarantined nodes
    nodes: tuple[str, ...] = ()  # alive nodes that fit at least one such run


@dataclass
class Finished:
    result: RunResult
    log_text: str
    worker: str
    started: float = 0.0  # wall-clock time the task began and ended in its worker
    ended: float = 0.0
    node: str = ""  # the Ray node it ran on (its whole id)


@functools.cache
def _sandbox(name: str, image: str, warm: bool = True):
    """One sandbox per worker process and kind (a Docker client and image check cost ~50 ms); a
    process sandbox keeps the next run's start-up done ahead (env/warm.py)."""
    return make_sandbox(name, image=image, warm=warm)


@ray.remote(num_cpus=0, max_concurrency=100_000)
class _StopBoard:
    """Where the controller says which runs to end. Each run's task awaits its own key; `stop`
    wakes the named ones, `release` the run's own when it ends by itself (no waiter is left)."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}
        self.places: dict[str, tuple[str, float]] = {}  # run key -> (node, start time), while it runs

    async def started(self, key: str, node: str, at: float) -> None:
        self.places[key] = (node, at)

    async def place(self, key: str) -> tuple[str, float] | None:
        """Where a lost run was (its task cannot say any more)."""
        return self.places.pop(key, None)

    def _event(self, key: str) -> asyncio.Event:
        return self.events.setdefault(key, asyncio.Event())

    async def wait(self, key: str) -> None:
        await self._event(key).wait()
        self.events.pop(key, None)

    async def stop(self, keys: list[str]) -> None:
        for key in keys:
            self._event(key).set()

    async def release(self, key: str) -> None:
        self._event(key).set()
        self.places.pop(key, None)


def _stopped(ref: ray.ObjectRef | None) -> bool:
    """The controller asked this run to end, or its board is gone (the controller died)."""
    return ref is not None and bool(ray.wait([ref], timeout=0)[0])


def _run(spec: RunSpec, sandbox_name: str, run_root: str, warm: bool = True, board: Any = None,
         key: str = "", store: Any = None, state: str = "") -> Finished:
    started = time.time()
    stop = board.wait.remote(key) if board is not None else None
    ctx = ray.get_runtime_context()
    if board is not None:
        board.started.remote(key, ctx.get_node_id(), started)  # the controller's answer if this run is lost
    gpu_ids = tuple(str(g) for g in ctx.get_accelerator_ids().get("GPU", []))
    spec = replace(spec, gpu_ids=gpu_ids or spec.gpu_ids)
    here = run_root_here(spec, run_root)  # not the controller's folder on another node (env/source.py)
    slot = "gpu" + "-".join(gpu_ids) if gpu_ids else f"cpu-{os.getpid()}"
    if gpu_ids and spec.target.resources.pack > 1:  # packed runs share the GPU: each worker is its own slot
        slot += f"-p{os.getpid()}"
    cancel = threading.Event()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            # a `[checkpoint]` target's run: restored from its saved state, if any (env/run_state.py)
            cont = Continuation(spec, store, state) if store is not None else None
            box["result"] = evaluate(spec, _sandbox(sandbox_name, spec.target.docker_image, warm), Path(here),
                                     cancel=cancel, continuation=cont)
        except BaseException as e:  # handed to the task's thread below
            box["error"] = e

    # The run goes on in a thread while this one waits in short joins: Ray's cancel raises in this
    # thread, which a sandbox blocked reading a silent trainer's output would never notice.
    thread = threading.Thread(target=work, name="evaluate", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
            if thread.is_alive() and _stopped(stop):
                cancel.set()  # the sandbox kills every process of the run, then evaluate returns
                thread.join(60)
    except BaseException:
        cancel.set()
        thread.join(60)
        raise
    finally:
        if board is not None:
            board.release.remote(key)
    if "error" in box:
        raise box["error"]
    result = box["result"]
    log = Path(result.log)
    text = log.read_text(errors="replace")[-LOG_CHARS:] if log.exists() else ""
    if here != run_root and log.parent.parent == Path(here):
        # Another node's folder: the log goes back by value and the controller never sees this path.
        shutil.rmtree(log.parent, ignore_errors=True)
    node = ctx.get_node_id()
    return Finished(result, text, f"{node[:12]}/{slot}", started, time.time(), node)


@ray.remote
def _noop(seconds: float) -> None:
    time.sleep(seconds)  # held long enough that each call gets its own worker process


class Pool:
    """Submit RunSpecs, get RunResults. Resources per run come from the target."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
                 sandbox: str = "process", run_root: Path | str | None = None, warm: bool = True):
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kw)
        self.sandbox = sandbox
        self.warm = warm  # start each worker's next run ahead (env/warm.py)
        self.run_root = str(run_root or cache_dir() / "runs")
        # No retries by Ray: they are invisible to the controller, which retries lost runs itself.
        self._remote = ray.remote(max_retries=0, retry_exceptions=False)(_run)
        self._board: Any = None  # made with the first run: an actor costs a worker process
        self._keys: dict[ray.ObjectRef, str] = {}
        self._sent: dict[ray.ObjectRef, tuple[RunSpec, float]] = {}  # what each run is, and when it was sent
        self._store: Any = None  # checkpointed runs' states and progress (env/run_state.py), made when needed
        self._states: dict[ray.ObjectRef, str] = {}  # run -> its state's key
        self._submitted = 0
        self.quarantined: set[str] = set()  # nodes no run goes to any more
        self.gcs_text = ray.get_runtime_context().gcs_address or ""
        self._gcs = _host_port(self.gcs_text)
        # This process's own node: with its raylet gone, Ray ends the process at the next touch of the
        # object store ("connection to the plasma store is failed"), so it is asked first.
        node = getattr(ray._private.worker.global_worker, "node", None)
        self._raylet = getattr(node, "raylet_socket_name", None)
        self._raylet_proc = _raylet_process(self._raylet)

    def warm_up(self, n: int, cpus: int = 1, gpus: float = 0) -> None:
        """Start `n` worker processes now (Ray starts them lazily, a second or more each), so the
        first runs of a search do not wait for them."""
        ray.get([_noop.options(num_cpus=cpus, num_gpus=gpus).remote(0.2) for _ in range(n)])

    def capacity(self, cpus: int, gpus: float) -> int:
        """How many runs of this size fit in the cluster at once (at least 1)."""
        return max(1, self.view(cpus, gpus).fits)

    def reachable(self, timeout: float = 1.0) -> bool:
        return not self.unreachable(timeout)

    def unreachable(self, timeout: float = 1.0) -> str:
        """Why the cluster cannot be used now ("" when it can): this process's node or the GCS does
        not answer a connection. Asked before anything that needs them: with the GCS gone Ray's
        calls block (and Ray ends the process a minute later); with the node's raylet gone Ray ends
        the process at once."""
        if not self.local_node_alive():
            return "this machine's Ray node (its raylet) is gone"
        if self._gcs is None:
            return ""
        try:
            socket.create_connection(self._gcs, timeout=timeout).close()
            return ""
        except OSError:
            return f"its GCS at {self.gcs_text} does not answer"

    def local_node_alive(self) -> bool:
        if not self._raylet:
            return True
        if self._raylet_proc is not None:  # a look at the process: a connection would cost a log line there
            try:
                return self._raylet_proc.is_running() and self._raylet_proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(self._raylet)
            return True
        except OSError:
            return False

    def view(self, cpus: int, gpus: float) -> ClusterView:
        """The alive nodes, and how many runs of this size fit on those not quarantined. Counted
        per node: two half-free nodes do not make room for a run that needs a whole one. `gpus` is
        a fraction for packed runs (`Resources.ray_gpus`)."""
        if not self.reachable():
            return ClusterView(False)
        fits, nodes = 0, []
        for n in ray.nodes():
            res = n.get("Resources") or {}
            if not n.get("Alive") or n["NodeID"] in self.quarantined:
                continue
            # (the small margin: 0.3333 of a GPU fits 3 times in 1, as it does for Ray)
            here = [int(res.get("CPU", 0) // max(cpus, 1))] + ([int(res.get("GPU", 0) / gpus + 1e-6)] if gpus else [])
            if min(here) > 0:
                fits += min(here)
                nodes.append(n["NodeID"])
        return ClusterView(True, fits, tuple(nodes))

    def submit(self, spec: RunSpec, avoid: str = "") -> ray.ObjectRef:
        """Send one run. `avoid`: a node it should not go to when another can take it (a retry of a
        run lost there); quarantined nodes get no run at all."""
        # Workers may have started with another environment: the controller's multicast settings travel along.
        carried = tuple((k, os.environ[k]) for k in MULTICAST_OFF if k in os.environ and k not in dict(spec.env))
        if carried:
            spec = replace(spec, env=spec.env + carried)
        spec = ship(spec)  # by value: the source, the passthrough environment, the code version (env/source.py)
        res = spec.target.resources
        # Packed: 1/pack of a GPU each, so Ray runs `pack` of them at once on it, all seeing that GPU.
        kw: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.ray_gpus}
        hard = {NODE_LABEL: NotIn(*sorted(self.quarantined))} if self.quarantined else {}
        soft = {NODE_LABEL: NotIn(avoid)} if avoid and avoid not in self.quarantined else None
        if hard or soft:
            kw["scheduling_strategy"] = NodeLabelSchedulingStrategy(hard, soft=soft)
        options = self._remote.options(**kw)
        if self._board is None:  # on the controller's node: it must outlive any other node
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            self._board = _StopBoard.options(scheduling_strategy=here).remote()
        self._submitted += 1
        key = f"{self._submitted}-{spec.run_id}"
        store, state = self._state_of(spec)
        ref = options.remote(spec, self.sandbox, self.run_root, self.warm, self._board, key, store, state)
        if state:
            self._states[ref] = state
        self._keys[ref] = key
        self._sent[ref] = (spec, time.time())
        return ref

    def wait(self, refs: list[ray.ObjectRef], timeout: float | None = None) -> list[ray.ObjectRef]:
        if not refs:
            return []
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if done:  # collect everything else that is already finished too
            more, _ = ray.wait([r for r in refs if r not in done], num_returns=len(refs) - len(done), timeout=0)
            done += more
        return done

    def get(self, ref: ray.ObjectRef) -> Finished:
        """The run's result; `RunLost` when its worker, node or cluster went away."""
        key = self._keys.pop(ref, None)
        spec, sent = self._sent.pop(ref, (None, time.time()))
        if not self.local_node_alive():  # not even a look at the result: Ray would end this process
            raise RunLost(spec, "", sent, rx.LocalRayletDiedError())
        state = self._states.pop(ref, None)
        try:
            finished = ray.get(ref)
            if state:  # the controller has the result: the run's saved state is of no more use
                self._store.drop.remote(state)
            return finished
        except LOST as e:
            node, started = "", sent
            if key is not None and self._board is not None and self.reachable():
                try:
                    node, started = ray.get(self._board.place.remote(key), timeout=10) or ("", sent)
                except Exception:  # the board went too: the attempt is still recorded, without its node
                    pass
            raise RunLost(spec, node, started, e) from None

    def stop(self, refs: list[ray.ObjectRef], timeout: float = 60.0) -> None:
        """End these runs and wait for their tasks: each sandbox kills its run, frees its volume,
        and the task returns. Said through the board, not `ray.cancel`: a cancel that crosses the
        task's own reply aborts the controller (Ray's check "Tried to complete task that was not
        pending"). A task still there after `timeout` has its worker killed."""
        keys = [self._keys.pop(r) for r in refs if r in self._keys]
        for r in refs:
            self._sent.pop(r, None)
            self._states.pop(r, None)  # its saved state stays: a resumed search continues from it
        if keys:
            ray.get(self._board.stop.remote(keys))
        if refs and timeout > 0:
            _, left = ray.wait(refs, num_returns=len(refs), timeout=timeout)
            for ref in left:
                ray.cancel(ref, force=True)

    def _state_of(self, spec: RunSpec) -> tuple[Any, str]:
        """The state store and the run's key there, for a target that checkpoints; kept beside the
        search's runs folder (its `run_state/`), where a resumed search finds it."""
        if spec.target.checkpoint is None:
            return None, ""
        if self._store is None:
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            folder = Path(self.run_root).parent / "run_state"
            self._store = RunStateStore.options(scheduling_strategy=here).remote(str(folder))
        return self._store, state_key(spec)

    def running(self) -> dict[str, dict]:
        """The checkpointed runs under way: their progress (step, total, observed seconds)."""
        return ray.get(self._store.running.remote(), timeout=10) if self._store is not None else {}

    def cancel(self, ref: ray.ObjectRef) -> None:
        """End one run, without waiting for its task."""
        self.stop([ref], timeout=0)

    def run(self, spec: RunSpec) -> Finished:
        return ray.get(self.submit(spec))

    @staticmethod
    def shutdown() -> None:
        if ray.is_initialized():
            ray.shutdown()


def _raylet_process(socket_name: str | None) -> psutil.Process | None:
    """The raylet serving this process's node, when it runs on this machine (found once)."""
    if not socket_name:
        return None
    for p in psutil.process_iter(["name", "cmdline"]):
        if "raylet" in (p.info["name"] or "") and f"--raylet_socket_name={socket_name}" in (p.info["cmdline"] or []):
            return p
    return None


def _host_port(address: str | None) -> tuple[str, int] | None:
    host, _, port = (address or "").rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def wait_for_workers(pool: Pool, timeout: float = 60.0) -> None:
    """Block until the cluster reports its resources (a fresh local cluster takes a moment)."""
    t0 = time.time()
    while not ray.cluster_resources().get("CPU") and time.time() - t0 < timeout:
        time.sleep(0.1)
