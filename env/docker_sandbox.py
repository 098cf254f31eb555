"""DockerSandbox: one command in a locked-down container (no network, read-only root, non-root,
no capabilities, pids/memory/CPU limits), with the same environment allow-list, log streaming and
kill semantics as ProcessSandbox, and the same caps: log bytes, workspace disk, processes.

What keeps the run contained, and where:
- output: an attach socket, Docker's own log off (env/docker_attach.py); at most `limits.log_mb`;
- the kill: `docker kill`, escalated to the container's cgroups when it fails (env/docker_kill.py);
- disk: the workdir is a size-capped volume (env/volume.py) bind-mounted into the container;
- hidden paths: never mounted; where one lies under a mount, an empty read-only overlay covers it.
Containers are labelled so that `reap` can remove leftovers of a crashed worker.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

from env.cache_layer import mount_reader
from env.cgroup import cpu_seconds
from env.docker_attach import AttachStream, LineSink
from env.docker_image import RUNNER_GID, RUNNER_UID, ensure_image, host_mounts
from env.docker_kill import REMOVE_CALL_S, ContainerCgroups, Leader, call_with_deadline, stop_container
from env.guardian import guardian
from env.namespaces import CACHE_LAYERS
from env.process_sandbox import MAX_LINE_BYTES, cpu_time_limit_s, sandbox_env
from env.sandbox import LineCallback, SandboxOutcome, SandboxRequest
from env.volume import Workspaces, unmount_nested

LABEL = "speedsearch"
RUN_ID_LABEL = "speedsearch.run_id"
WORKDIR_LABEL = "speedsearch.workdir"  # whose run a container is, when several searches share a daemon

def docker_client(timeout: int = 60):
    import docker

    return docker.from_env(timeout=timeout)


def reap(client=None, older_than_s: float = 3600.0, labels: dict[str, str] | None = None) -> list[str]:
    """Remove every speedsearch container created more than `older_than_s` ago (running or not):
    the leftovers of a worker that died mid-run. Returns the ids removed. Choose `older_than_s`
    above the longest timeout so that live runs of other workers are spared; `labels` narrows it
    further (e.g. one search's WORKDIR_LABEL)."""
    import docker

    client = client or docker_client()
    now = time.time()
    removed = []
    wanted = [f"{LABEL}=1", *(f"{k}={v}" for k, v in (labels or {}).items())]
    for c in client.api.containers(all=True, filters={"label": wanted}):
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
        # not into a compile-cache overlay (env/cache_layer.py): the shared layer below stays as it is
        dirnames[:] = [d for d in dirnames if d != CACHE_LAYERS and not os.path.ismount(os.path.join(dirpath, d))]
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            st = os.lstat(name)
            if st.st_uid != uid or st.st_gid != gid:
                os.lchown(name, uid, gid)


class _Probe:
    """Reads the container's cgroups from the host (cheaper than the stats API, which waits a second
    per sample): resident memory (not page cache) and refused forks. Best effort: 0 where not found."""

    def __init__(self, cgroups: ContainerCgroups):
        self.memory_stat = cgroups.file("memory", "memory.stat")
        self.pids_events = cgroups.file("pids", "pids.events")
        self.cpu_dirs = [d for d in (cgroups.dirs.get(""), cgroups.dirs.get("cpuacct")) if d is not None]
        self.peak_mb = 0.0
        self.forks_refused = 0
        self.cpu_s: float | None = None  # the last count read (the cgroup goes with the container)

    def sample(self) -> None:
        fields = _flat_keyed(self.memory_stat)
        keys = ("total_rss", "total_mapped_file") if "total_rss" in fields else ("anon", "file_mapped")
        self.peak_mb = max(self.peak_mb, sum(fields.get(k, 0) for k in keys) / 2**20)
        self.forks_refused = max(self.forks_refused, _flat_keyed(self.pids_events).get("max", 0))
        cpu = cpu_seconds(self.cpu_dirs)
        if cpu is not None:
            self.cpu_s = max(self.cpu_s or 0.0, cpu)


def _flat_keyed(path: Path | None) -> dict[str, int]:
    if path is None:
        return {}
    try:
        with open(path) as f:
            return {k: int(v) for k, v in (line.split() for line in f)}
    except (OSError, ValueError):
        return {}


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def hide_overlays(volumes: dict[str, dict],
                  hide: tuple[Path, ...]) -> tuple[dict[str, dict], dict[str, str], list[str]]:
    """Keep `hide` out of the container. A hidden path that is not under any mount is simply never
    seen (the image holds nothing of the host); a mount that is itself hidden (or lies inside a
    hidden path) is dropped; a hidden path inside a mount is covered: a directory by an empty
    read-only tmpfs, a file by /dev/null. Returns (volumes, tmpfs mounts, files to cover)."""
    hidden = [os.path.realpath(h) for h in hide]
    volumes = {src: v for src, v in volumes.items() if not any(_under(src, h) for h in hidden)}
    tmpfs: dict[str, str] = {}
    files: list[str] = []
    for h in hidden:
        if not os.path.lexists(h) or not any(_under(h, src) for src in volumes):
            continue
        if os.path.isdir(h):
            tmpfs[h] = "ro,size=4k,mode=0555"
        else:
            files.append(h)
    return volumes, tmpfs, files


class DockerSandbox:
    """Runs `/bin/sh -c command` in a container of `image`, with:

    - network_mode none, a read-only root, a tmpfs at /tmp (HOME and TMPDIR), no-new-privileges,
      every capability dropped, pids (`limits.pids`), memory (no swap) and nano_cpus from the limits;
    - the workdir on a size-capped volume (`limits.disk_mb`), bind-mounted read-write at the same
      path (and the cwd), `data` read-only, `cache_dir` read-write, nothing of `hide`; the host's
      system and Python directories read-only (`host_mounts`) when the image is the assembled one
      (see env/docker_image.py), nothing of the host otherwise;
    - a non-root user: the caller's uid, or 65534 when the caller is root (the workdir and cache
      are then chowned to it);
    - GPUs only by id, through a device request, when `limits.gpu_ids` is not empty;
    - the environment of `sandbox_env`, plus USER/LOGNAME (getpass needs a name for uid 65534);
    - output read through an attach socket (Docker keeps no log), at most `limits.log_mb`.

    Timeout, `cancel`, `on_line` returning True, the log cap and a full disk kill the container
    (`docker kill`, escalated through its cgroups when that fails); an OOM-killed container is
    reported as killed="memory". The container is removed whatever happens; the workdir's volume
    stays mounted until `release`.
    """

    name = "docker"

    def __init__(self, image: str = "speedsearch-runner:latest", pids_limit: int | None = None, tmpfs_mb: int = 1024,
                 shm_mb: int | None = None, extra_mounts: tuple[str, ...] = (), interval_s: float = 0.1,
                 client=None):
        self.image = image
        self.pids_limit = pids_limit  # None: each request's limits.pids
        self.tmpfs_mb = tmpfs_mb
        self.shm_mb = shm_mb
        self.extra_mounts = extra_mounts
        self.interval_s = interval_s
        self._client = client
        self._assembled: bool | None = None
        self._workspaces: Workspaces | None = None

    def __getstate__(self):  # a docker client and mounted volumes do not pickle (Ray ships the sandbox)
        return {**self.__dict__, "_client": None, "_assembled": None, "_workspaces": None}

    @property
    def client(self):
        if self._client is None:
            self._client = docker_client()
        return self._client

    @property
    def workspaces(self) -> Workspaces:
        if self._workspaces is None:
            self._workspaces = Workspaces()
        return self._workspaces

    def reap(self, older_than_s: float = 3600.0) -> list[str]:
        return reap(self.client, older_than_s)

    def release(self, workdir: Path, keep: bool = False) -> None:
        """Unmount the workdir's volume (its files stay on the host's disk when `keep`)."""
        unmount_nested(Path(workdir))  # a cache overlay in a workspace without a volume of its own
        if self._workspaces is not None:
            self._workspaces.release(workdir, keep=keep)

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
        if request.data is not None:  # the data folder given, nothing beside it (a held-out split)
            data = str(Path(request.data).resolve())
            volumes[data] = {"bind": data, "mode": "ro"}
        if request.cache_dir is not None and request.cache_write:
            Path(request.cache_dir).mkdir(parents=True, exist_ok=True)
            cache = str(Path(request.cache_dir).resolve())
            volumes[cache] = {"bind": cache, "mode": "rw"}
        volumes[workdir] = {"bind": workdir, "mode": "rw"}
        volumes, hidden_dirs, hidden_files = hide_overlays(volumes, tuple(request.hide))
        env = {**sandbox_env(request, home="/tmp", tmp="/tmp"), "USER": "runner", "LOGNAME": "runner"}
        if request.cache_dir is not None and not request.cache_write:  # its own overlay, in its workdir
            owner = (RUNNER_UID, RUNNER_GID) if os.getuid() == 0 else None
            cache, _ = mount_reader(Path(request.cache_dir).resolve(), Path(workdir) / ".sandbox", owner)
            env.update(TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
        env.update(request.env)  # request.env wins, also over USER/LOGNAME
        cpu_s = cpu_time_limit_s(limits)
        config = dict(
            image=self.image, command=["/bin/sh", "-c", request.command], user=self._user(request),
            working_dir=workdir, environment=env, labels={LABEL: "1", RUN_ID_LABEL: run_id, WORKDIR_LABEL: workdir},
            name=f"speedsearch-{run_id}", network_mode="none", read_only=True,
            # exec: inductor and Triton load the kernels they compile from their caches, /tmp by default.
            tmpfs={"/tmp": f"rw,exec,nosuid,nodev,size={self.tmpfs_mb}m,mode=1777", **hidden_dirs},
            volumes=volumes,
            mounts=[docker.types.Mount(f, "/dev/null", type="bind", read_only=True) for f in hidden_files],
            security_opt=["no-new-privileges"], cap_drop=["ALL"], pids_limit=self.pids_limit or limits.pids,
            mem_limit=f"{limits.memory_mb}m", memswap_limit=f"{limits.memory_mb}m",
            nano_cpus=int(limits.cpus * 1e9), shm_size=f"{self.shm_mb or max(64, limits.memory_mb // 4)}m",
            ulimits=[docker.types.Ulimit(name="core", soft=0, hard=0),
                     docker.types.Ulimit(name="cpu", soft=cpu_s, hard=cpu_s)],
            # Docker keeps no copy of the output: it is read (and capped) through the attach socket.
            log_config=docker.types.LogConfig(type="none"),
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

    def _containment(self, request: SandboxRequest, disk: str, cgroups: ContainerCgroups | None) -> dict[str, str]:
        limits = request.limits
        return {
            "cgroup": f"docker: pids {self.pids_limit or limits.pids}, memory {limits.memory_mb} MB; kill "
                      f"escalates to {cgroups.describe() if cgroups else 'none found'}",
            "namespaces": "docker: pid, mount, ipc, uts, network none; uid "
                          f"{RUNNER_UID if os.getuid() == 0 else os.getuid()}, no capabilities",
            "disk": disk,
            "log": f"attach socket, Docker's log off, {limits.log_mb} MB cap",
        }

    def run(self, request: SandboxRequest, on_line: LineCallback | None = None,
            cancel: threading.Event | None = None) -> SandboxOutcome:
        t0 = time.monotonic()
        limits = request.limits
        run_id = uuid.uuid4().hex[:12]
        log_path = Path(request.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        volume = None
        if limits.disk_mb > 0:
            owner = (RUNNER_UID, RUNNER_GID) if os.getuid() == 0 else None
            volume = self.workspaces.mount(Path(request.workdir), limits.disk_mb, owner)
        disk = volume.kind if volume is not None else "none (disk_mb = 0)"
        container = self._create(request, run_id)
        keeper = guardian()  # removes the container if this process dies under it (env/guardian.py)
        if keeper is not None:
            keeper.watch("ct", container.id)
        stream = leader = cgroups = began = None
        killed, detail, escalation = None, "", ""
        try:
            stream = AttachStream(self.client, container.id)  # before start: no early line is lost
            began = time.monotonic()  # the command may run from here (the container is made)
            container.start()
            container.reload()
            pid = container.attrs["State"].get("Pid") or 0
            cgroups, leader = ContainerCgroups(pid, container.id), Leader(pid)
            probe = _Probe(cgroups)
            with open(log_path, "wb") as log:
                sink = LineSink(log, on_line, limits.log_mb << 20, MAX_LINE_BYTES)
                try:
                    killed, detail = self._follow(request, stream, sink, leader, probe, volume, cancel, t0)
                finally:
                    sink.stop = killed is not None or sink.stop
                    stream.close()  # nothing is read after the kill (or the end)
                    if (sink.flush() == "stopped") and killed is None:
                        killed, detail = "stopped", "stopped by on_line"
            if killed is not None:
                escalation = stop_container(container, cgroups, leader)
                exit_code = None
            else:
                exit_code, killed, detail = self._ending(container, request, volume)
            probe.sample()
            if probe.forks_refused and killed not in ("log", "disk", "memory"):
                detail = "; ".join(x for x in (detail, f"process limit {self.pids_limit or limits.pids} reached "
                                                      f"({probe.forks_refused} forks refused)") if x)
        except BaseException as e:
            if killed is None:
                killed, detail = "cancelled", f"{type(e).__name__}: {e}"
            escalation = stop_container(container, cgroups or ContainerCgroups(0, container.id), leader or Leader(0))
            raise
        finally:
            if stream is not None:
                stream.close()
            if leader is not None:
                leader.close()
            # After an escalation the daemon may be the wedged part: wait less for it (the call goes on).
            _, removal_error = call_with_deadline(lambda: container.remove(force=True),
                                                  3.0 if escalation else REMOVE_CALL_S)
            if keeper is not None and removal_error is None:
                keeper.unwatch("ct", container.id)
        containment = self._containment(request, disk, cgroups)
        if escalation:
            containment["kill"] = escalation
            detail = f"{detail}; {escalation}"
        if removal_error is not None:
            containment["removal"] = f"container {container.id[:12]} not removed ({removal_error}); the reaper will"
        return SandboxOutcome(exit_code=exit_code, killed=killed, wall_s=time.monotonic() - t0,
                              peak_rss_mb=probe.peak_mb, cpu_s=probe.cpu_s, began=began, detail=detail,
                              containment=containment)

    def _follow(self, request: SandboxRequest, stream: AttachStream, sink: LineSink, leader: Leader, probe: _Probe,
                volume, cancel: threading.Event | None, t0: float) -> tuple[str | None, str]:
        """Read the output until the run ends, or until a reason to kill it: (killed, detail)."""
        limits = request.limits
        deadline = t0 + limits.timeout_s
        next_sample = 0.0
        drain_until = None  # the init exited: its last lines are in flight, but wait for them only briefly
        while True:
            # Read first, then judge: a line that arrived before the verdict is the run's (it may
            # be the only sign of what it was doing); one that arrives after is never read.
            if not stream.eof and stream.readable(self.interval_s):
                for payload in stream.read():
                    if verdict := sink.feed(payload):
                        return verdict, (f"log over {limits.log_mb} MB" if verdict == "log" else "stopped by on_line")
            now = time.monotonic()
            if cancel is not None and cancel.is_set():
                return "cancelled", "cancelled by the caller"
            if now > deadline:
                return "timeout", f"time limit {limits.timeout_s:g} s exceeded"
            if now >= next_sample:
                next_sample = now + self.interval_s
                probe.sample()
                if volume is not None and volume.full():
                    return "disk", f"disk quota ({limits.disk_mb} MB)"
            if stream.eof:  # the output closed: wait for the init (a daemon may keep the container up)
                if leader.fd is None or leader.gone(self.interval_s):
                    return None, ""
            elif drain_until is None and leader.gone():
                drain_until = now + 2.0
                probe.sample()  # the last look at its counters: the cgroup goes with the container
            elif drain_until is not None and now > drain_until:
                return None, ""

    def _ending(self, container, request: SandboxRequest, volume) -> tuple[int | None, str | None, str]:
        """(exit code, killed, detail) of a run that ended by itself: an OOM kill or a full disk is
        named as the cause, whatever the exit code."""
        limits = request.limits
        answer, error = call_with_deadline(lambda: container.wait(timeout=30), 35)
        exit_code = answer["StatusCode"] if isinstance(answer, dict) else None
        _, inspect_error = call_with_deadline(container.reload, 10)
        state = container.attrs.get("State", {}) if inspect_error is None else {}
        if state.get("OOMKilled"):
            return None, "memory", f"memory limit {limits.memory_mb} MB exceeded (container OOM-killed)"
        if volume is not None and volume.full():
            return None, "disk", f"disk quota ({limits.disk_mb} MB)"
        if error is not None:
            return None, "cancelled", f"the daemon gave no exit status ({error})"
        return exit_code, None, ""
