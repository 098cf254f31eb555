"""DockerSandbox: one command in a locked-down container (no network, read-only root, non-root,
no capabilities, pids/memory/CPU limits), with the same environment allow-list, log streaming and
kill semantics as ProcessSandbox. Containers are labelled so that `reap` can remove leftovers of a
crashed worker.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

from env.docker_image import RUNNER_GID, RUNNER_UID, ensure_image, host_mounts
from env.process_sandbox import MAX_LINE_BYTES, cpu_time_limit_s, sandbox_env
from env.sandbox import LineCallback, SandboxOutcome, SandboxRequest

LABEL = "speedsearch"
RUN_ID_LABEL = "speedsearch.run_id"
_CGROUP_ROOTS = ("/sys/fs/cgroup/memory/docker/{id}", "/sys/fs/cgroup/memory/system.slice/docker-{id}.scope",
                 "/sys/fs/cgroup/docker/{id}", "/sys/fs/cgroup/system.slice/docker-{id}.scope")


def docker_client(timeout: int = 60):
    import docker

    return docker.from_env(timeout=timeout)


def reap(client=None, older_than_s: float = 3600.0) -> list[str]:
    """Remove every speedsearch container created more than `older_than_s` ago (running or not):
    the leftovers of a worker that died mid-run. Returns the ids removed. Choose `older_than_s`
    above the longest timeout so that live runs of other workers are spared."""
    import docker

    client = client or docker_client()
    now = time.time()
    removed = []
    for c in client.api.containers(all=True, filters={"label": f"{LABEL}=1"}):
        if now - c["Created"] >= older_than_s:
            try:
                client.api.remove_container(c["Id"], force=True)
                removed.append(c["Id"])
            except docker.errors.NotFound:
                pass
    return removed


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give the tree to the container's user (when we are root and it is not), so it can write there."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            st = os.lstat(name)
            if st.st_uid != uid or st.st_gid != gid:
                os.lchown(name, uid, gid)


class _MemoryProbe:
    """Reads the container's memory cgroup from the host (cheaper than the stats API, which waits a
    second per sample); resident memory only, not page cache. Best effort: 0 where not found."""

    def __init__(self, container_id: str):
        self.candidates = [os.path.join(r.format(id=container_id), "memory.stat") for r in _CGROUP_ROOTS]
        self.stat: str | None = None
        self.peak_mb = 0.0

    def sample(self) -> None:
        if self.stat is None:  # the cgroup exists once the container has started
            self.stat = next((p for p in self.candidates if os.path.exists(p)), None)
            if self.stat is None:
                return
        try:
            with open(self.stat) as f:
                fields = dict(line.split() for line in f)
        except (OSError, ValueError):
            return
        keys = ("total_rss", "total_mapped_file") if "total_rss" in fields else ("anon", "file_mapped")
        self.peak_mb = max(self.peak_mb, sum(int(fields.get(k, 0)) for k in keys) / 2**20)


class DockerSandbox:
    """Runs `/bin/sh -c command` in a container of `image`, with:

    - network_mode none, a read-only root, a tmpfs at /tmp (HOME and TMPDIR), no-new-privileges,
      every capability dropped, `pids_limit`, memory (no swap) and nano_cpus from the limits;
    - the workdir bind-mounted read-write at the same path (and the cwd), `data` read-only,
      `cache_dir` read-write; the host's system and Python directories read-only (`host_mounts`)
      when the image is the assembled one (see env/docker_image.py), nothing of the host otherwise;
    - a non-root user: the caller's uid, or 65534 when the caller is root (the workdir and cache
      are then chowned to it);
    - GPUs only by id, through a device request, when `limits.gpu_ids` is not empty;
    - the environment of `sandbox_env`, plus USER/LOGNAME (getpass needs a name for uid 65534).

    Timeout, `cancel` and `on_line` returning True kill the container (SIGKILL to its init, which
    takes the whole pid namespace down); an OOM-killed container is reported as killed="memory".
    The container is removed whatever happens.
    """

    name = "docker"

    def __init__(self, image: str = "speedsearch-runner:latest", pids_limit: int = 4096, tmpfs_mb: int = 1024,
                 shm_mb: int | None = None, extra_mounts: tuple[str, ...] = (), interval_s: float = 0.1,
                 client=None):
        self.image = image
        self.pids_limit = pids_limit
        self.tmpfs_mb = tmpfs_mb
        self.shm_mb = shm_mb
        self.extra_mounts = extra_mounts
        self.interval_s = interval_s
        self._client = client
        self._assembled: bool | None = None

    def __getstate__(self):  # a docker client does not pickle (Ray ships the sandbox to workers)
        return {**self.__dict__, "_client": None, "_assembled": None}

    @property
    def client(self):
        if self._client is None:
            self._client = docker_client()
        return self._client

    def reap(self, older_than_s: float = 3600.0) -> list[str]:
        return reap(self.client, older_than_s)

    def _user(self, request: SandboxRequest) -> str:
        if os.getuid() != 0:
            return f"{os.getuid()}:{os.getgid()}"
        _chown_tree(Path(request.workdir), RUNNER_UID, RUNNER_GID)
        cache = request.cache_dir
        # What the container writes into the cache is its own already: walk it only the first time.
        if cache is not None and os.lstat(cache).st_uid != RUNNER_UID:
            _chown_tree(Path(cache), RUNNER_UID, RUNNER_GID)
        return f"{RUNNER_UID}:{RUNNER_GID}"

    def _config(self, request: SandboxRequest, run_id: str) -> dict:
        import docker

        limits = request.limits
        workdir = str(Path(request.workdir).resolve())
        if self._assembled is None:
            self._assembled = ensure_image(self.client, self.image)
        volumes = {p: {"bind": p, "mode": "ro"} for p in host_mounts(self.extra_mounts)} if self._assembled else {}
        if request.data is not None:
            data = str(Path(request.data).resolve())
            volumes[data] = {"bind": data, "mode": "ro"}
        if request.cache_dir is not None:
            Path(request.cache_dir).mkdir(parents=True, exist_ok=True)
            cache = str(Path(request.cache_dir).resolve())
            volumes[cache] = {"bind": cache, "mode": "rw"}
        volumes[workdir] = {"bind": workdir, "mode": "rw"}
        env = {**sandbox_env(request, home="/tmp", tmp="/tmp"), "USER": "runner", "LOGNAME": "runner"}
        env.update(request.env)  # request.env wins, also over USER/LOGNAME
        cpu_s = cpu_time_limit_s(limits)
        config = dict(
            image=self.image, command=["/bin/sh", "-c", request.command], user=self._user(request),
            working_dir=workdir, environment=env, labels={LABEL: "1", RUN_ID_LABEL: run_id},
            name=f"speedsearch-{run_id}", network_mode="none", read_only=True,
            # exec: inductor and Triton load the kernels they compile from their caches, /tmp by default.
            tmpfs={"/tmp": f"rw,exec,nosuid,nodev,size={self.tmpfs_mb}m,mode=1777"}, volumes=volumes,
            security_opt=["no-new-privileges"], cap_drop=["ALL"], pids_limit=self.pids_limit,
            mem_limit=f"{limits.memory_mb}m", memswap_limit=f"{limits.memory_mb}m",
            nano_cpus=int(limits.cpus * 1e9), shm_size=f"{self.shm_mb or max(64, limits.memory_mb // 4)}m",
            ulimits=[docker.types.Ulimit(name="core", soft=0, hard=0),
                     docker.types.Ulimit(name="cpu", soft=cpu_s, hard=cpu_s)],
            stdin_open=False, tty=False, detach=True)
        if limits.gpu_ids:
            config["device_requests"] = [docker.types.DeviceRequest(device_ids=list(limits.gpu_ids),
                                                                    capabilities=[["gpu"]])]
        return config

    def _create(self, request: SandboxRequest, run_id: str):
        import docker

        try:
            return self.client.containers.create(**self._config(request, run_id))
        except docker.errors.ImageNotFound:  # removed since we checked (a daemon reset, a prune)
            self._assembled = None
            return self.client.containers.create(**self._config(request, run_id))

    def run(self, request: SandboxRequest, on_line: LineCallback | None = None,
            cancel: threading.Event | None = None) -> SandboxOutcome:
        t0 = time.monotonic()
        run_id = uuid.uuid4().hex[:12]
        log_path = Path(request.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        container = self._create(request, run_id)
        state = {"killed": None, "detail": ""}
        lock, done = threading.Lock(), threading.Event()
        probe = _MemoryProbe(container.id)

        def kill(reason: str, detail: str) -> None:
            with lock:
                if state["killed"] is None:
                    state["killed"], state["detail"] = reason, detail
            try:
                container.kill()
            except Exception:  # already stopped
                pass

        def watch() -> None:
            deadline = t0 + request.limits.timeout_s
            while not done.wait(self.interval_s):
                probe.sample()
                if state["killed"] is not None:
                    continue
                if cancel is not None and cancel.is_set():
                    kill("cancelled", "cancelled by the caller")
                elif time.monotonic() > deadline:
                    kill("timeout", f"time limit {request.limits.timeout_s:g} s exceeded")

        watchdog = threading.Thread(target=watch, name=f"sandbox-watch-{run_id}", daemon=True)
        try:
            container.start()
            watchdog.start()
            with open(log_path, "wb") as log:
                self._pump(container, log, on_line, kill, state)
            exit_code = container.wait(timeout=max(60.0, request.limits.timeout_s))["StatusCode"]
            container.reload()
            if container.attrs["State"].get("OOMKilled") and state["killed"] is None:
                state["killed"] = "memory"
                state["detail"] = f"memory limit {request.limits.memory_mb} MB exceeded (container OOM-killed)"
        except BaseException as e:
            kill("cancelled", f"{type(e).__name__}: {e}")
            raise
        finally:
            done.set()
            if watchdog.is_alive():
                watchdog.join()
            try:
                container.remove(force=True)
            except Exception:
                pass
        return SandboxOutcome(exit_code=None if state["killed"] else exit_code, killed=state["killed"],
                              wall_s=time.monotonic() - t0, peak_rss_mb=probe.peak_mb, detail=state["detail"])

    @staticmethod
    def _pump(container, log, on_line: LineCallback | None, kill, state: dict) -> None:
        """Docker hands out chunks, not lines: re-cut them so on_line sees whole lines."""
        pending = b""

        def emit(raw: bytes) -> None:
            log.write(raw)
            log.flush()
            if on_line is not None and state["killed"] is None:
                if on_line(raw.decode("utf-8", "replace").rstrip("\r\n")):
                    kill("stopped", "stopped by on_line")

        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
            pending += chunk
            while (cut := pending.find(b"\n")) >= 0 or len(pending) >= MAX_LINE_BYTES:
                cut = cut + 1 if cut >= 0 else MAX_LINE_BYTES
                emit(pending[:cut])
                pending = pending[cut:]
        if pending:
            emit(pending)
