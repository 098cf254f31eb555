"""The pool: one Ray task per run, with the GPUs and CPUs the target asks for.

A local `ray.init()` by default, an address for a cluster, logical GPUs in tests. A dead node
retries the run (Ray's task retries); a failing trainer does not (evaluate returns, never raises).
Compile caches are the machine's (env/cache_layer.py): filled by the base's runs, read by the
candidates' through an overlay, so a candidate that keeps the graph does not pay for compilation
again and none can plant a kernel for another run.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray

from env.evaluate import RunSpec, evaluate, make_sandbox
from env.process_sandbox import MULTICAST_OFF
from search_space.records import RunResult
from search_space.target import cache_dir

LOG_CHARS = 4_000_000  # the log travels back with the result, so artifacts work across nodes


@dataclass
class Finished:
    result: RunResult
    log_text: str
    worker: str
    started: float = 0.0  # wall-clock time the task began and ended in its worker
    ended: float = 0.0


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


def _stopped(ref: ray.ObjectRef | None) -> bool:
    """The controller asked this run to end, or its board is gone (the controller died)."""
    return ref is not None and bool(ray.wait([ref], timeout=0)[0])


def _run(spec: RunSpec, sandbox_name: str, run_root: str, warm: bool = True, board: Any = None,
         key: str = "") -> Finished:
    started = time.time()
    stop = board.wait.remote(key) if board is not None else None
    ctx = ray.get_runtime_context()
    gpu_ids = tuple(str(g) for g in ctx.get_accelerator_ids().get("GPU", []))
    spec = replace(spec, gpu_ids=gpu_ids or spec.gpu_ids)
    slot = "gpu" + "-".join(gpu_ids) if gpu_ids else f"cpu-{os.getpid()}"
    cancel = threading.Event()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = evaluate(spec, _sandbox(sandbox_name, spec.target.docker_image, warm), Path(run_root),
                                     cancel=cancel)
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
    return Finished(result, text, f"{ctx.get_node_id()[:12]}/{slot}", started, time.time())


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
        self._remote = ray.remote(max_retries=3, retry_exceptions=False)(_run)
        self._board: Any = None  # made with the first run: an actor costs a worker process
        self._keys: dict[ray.ObjectRef, str] = {}
        self._submitted = 0

    def warm_up(self, n: int, cpus: int = 1, gpus: int = 0) -> None:
        """Start `n` worker processes now (Ray starts them lazily, a second or more each), so the
        first runs of a search do not wait for them."""
        ray.get([_noop.options(num_cpus=cpus, num_gpus=gpus).remote(0.2) for _ in range(n)])

    def capacity(self, cpus: int, gpus: int) -> int:
        """How many runs of this size fit in the cluster at once."""
        total = ray.cluster_resources()
        fits = [int(total.get("CPU", 0) // max(cpus, 1))]
        if gpus:
            fits.append(int(total.get("GPU", 0) // gpus))
        return max(1, min(fits))

    def submit(self, spec: RunSpec) -> ray.ObjectRef:
        # Workers may have started with another environment: the controller's multicast settings travel along.
        carried = tuple((k, os.environ[k]) for k in MULTICAST_OFF if k in os.environ and k not in dict(spec.env))
        if carried:
            spec = replace(spec, env=spec.env + carried)
        res = spec.target.resources
        options = self._remote.options(num_cpus=res.cpus, num_gpus=res.gpus)
        if self._board is None:
            self._board = _StopBoard.remote()
        self._submitted += 1
        key = f"{self._submitted}-{spec.run_id}"
        ref = options.remote(spec, self.sandbox, self.run_root, self.warm, self._board, key)
        self._keys[ref] = key
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
        self._keys.pop(ref, None)
        return ray.get(ref)

    def stop(self, refs: list[ray.ObjectRef], timeout: float = 60.0) -> None:
        """End these runs and wait for their tasks: each sandbox kills its run, frees its volume,
        and the task returns. Said through the board, not `ray.cancel`: a cancel that crosses the
        task's own reply aborts the controller (Ray's check "Tried to complete task that was not
        pending"). A task still there after `timeout` has its worker killed."""
        keys = [self._keys.pop(r) for r in refs if r in self._keys]
        if keys:
            ray.get(self._board.stop.remote(keys))
        if refs and timeout > 0:
            _, left = ray.wait(refs, num_returns=len(refs), timeout=timeout)
            for ref in left:
                ray.cancel(ref, force=True)

    def cancel(self, ref: ray.ObjectRef) -> None:
        """End one run, without waiting for its task."""
        self.stop([ref], timeout=0)

    def run(self, spec: RunSpec) -> Finished:
        return ray.get(self.submit(spec))

    @staticmethod
    def shutdown() -> None:
        if ray.is_initialized():
            ray.shutdown()


def wait_for_workers(pool: Pool, timeout: float = 60.0) -> None:
    """Block until the cluster reports its resources (a fresh local cluster takes a moment)."""
    t0 = time.time()
    while not ray.cluster_resources().get("CPU") and time.time() - t0 < timeout:
        time.sleep(0.1)
