"""A size-capped folder for a run's workspace: a sparse ext4 image, loop-mounted at the folder.

Why an image and not a tmpfs: a tmpfs lives in memory, so a run filling its disk would be charged
to its memory limit and die as "out of memory"; the image's pages are ordinary page cache, written
back and reclaimed. Why sparse: the image takes host disk only for what the run writes, so a 4 GB
cap costs nothing until used. Making and mounting one takes ~40 ms here (no journal, lazy inode
tables). Only root can mount; elsewhere `kind` says "none (...)" and the folder is a plain one.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

FULL_BYTES = 2 << 20  # under this much free space the volume counts as full


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MS_BIND, MNT_DETACH = 4096, 2


def bind_mount(source: Path, target: Path) -> None:
    """Show the filesystem at `source` also at `target` (a syscall: no mount(8) process to start)."""
    if _libc.mount(str(source).encode(), str(target).encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind mount {source} on {target}: {os.strerror(err)}")


def overlay_mount(lower: Path, upper: Path, work: Path, target: Path) -> bool:
    """Mount an overlay of `lower` (read-only) and `upper` (its writes) at `target`; False when the
    kernel refuses (no privilege, no overlayfs)."""
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    return _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, options) == 0


def unmount(path: Path) -> None:
    """Unmount `path`; if it is still busy, detach it now (freed when its last user goes)."""
    if _libc.umount2(str(path).encode(), 0) == 0:
        return
    if _libc.umount2(str(path).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def unmount_nested(folder: Path) -> None:
    """Unmount every mount strictly inside `folder` (a run's compile-cache overlay, env/cache_layer.py),
    deepest first, so the folder's own volume can go after it."""
    folder = Path(folder).resolve()
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [Path(f[4].replace("\\040", " ")) for f in (line.split() for line in lines) if len(f) > 4]
    for point in sorted((p for p in points if p != folder and p.is_relative_to(folder)),
                        key=lambda p: len(p.parts), reverse=True):
        try:
            unmount(point)
        except OSError:
            pass


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"{argv[0]}: {(proc.stderr or proc.stdout).strip()[-300:] or f'exit {proc.returncode}'}")


class Volume:
    """An empty ext4 filesystem of `size_mb` mounted at `path` (created if missing), until `close`.
    `owner` (uid, gid) owns its root directory, so an unprivileged run can write there."""

    def __init__(self, path: Path, size_mb: int, owner: tuple[int, int] | None = None):
        self.path = Path(path)
        self.size_mb = size_mb
        self.path.mkdir(parents=True, exist_ok=True)
        # Beside the folder, not inside it: the run never sees its own image. The name holds the
        # owner's pid, so a later process can unmount the volumes of one that was killed.
        self.image = self.path.parent / f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.img"
        self.mounted = False
        try:
            self._make(owner)
            self.kind = f"loop ext4 {size_mb} MB"
        except OSError as e:
            self.image.unlink(missing_ok=True)
            self.kind = f"none ({e}; the workspace has no size cap)"

    def _make(self, owner: tuple[int, int] | None) -> None:
        if os.geteuid() != 0:
            raise OSError("not root, cannot mount")
        if shutil.which("mkfs.ext4") is None:
            raise OSError("mkfs.ext4 missing (apt package e2fsprogs)")
        with open(self.image, "wb") as f:
            f.truncate(self.size_mb << 20)
        extended = "lazy_itable_init=1,lazy_journal_init=1"
        if owner is not None:
            extended += f",root_owner={owner[0]}:{owner[1]}"
        _run(["mkfs.ext4", "-q", "-F", "-E", extended, "-O", "^has_journal", "-m", "0", str(self.image)])
        _run(["mount", "-o", "loop,nosuid,nodev", str(self.image), str(self.path)])
        self.mounted = True
        try:
            (self.path / "lost+found").rmdir()  # keep the run's folder as it was given
        except OSError:
            pass

    @property
    def capped(self) -> bool:
        return self.mounted

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def full(self) -> bool:
        if not self.mounted:
            return False
        try:
            return self.free_bytes() < FULL_BYTES
        except OSError:
            return False

    def close(self) -> None:
        if self.mounted:
            unmount_nested(self.path)
            unmount(self.path)
            self.mounted = False
        self.image.unlink(missing_ok=True)


def mount_over(path: Path, size_mb: int, owner: tuple[int, int] | None = None) -> Volume:
    """A Volume at `path`, keeping what `path` held: its files move onto the new filesystem. Meant
    for a freshly materialised workspace (small); where no volume can be made the files stay put."""
    path = Path(path)
    if not path.exists() or not any(path.iterdir()):
        return Volume(path, size_mb, owner)
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.aside")
    path.rename(aside)
    volume = Volume(path, size_mb, owner)
    if not volume.mounted:
        path.rmdir()
        aside.rename(path)
        return volume
    shutil.copytree(aside, path, symlinks=True, dirs_exist_ok=True)
    shutil.rmtree(aside, ignore_errors=True)
    return volume


def unmount_keeping(volume: Volume) -> None:
    """Close `volume` but keep its files at its path, on the host's disk (for a kept workspace)."""
    if not volume.mounted:
        volume.close()
        return
    aside = volume.path.with_name(f".{volume.path.name}.{uuid.uuid4().hex[:8]}.kept")
    shutil.copytree(volume.path, aside, symlinks=True)
    volume.close()
    volume.path.rmdir()
    aside.rename(volume.path)


def _loop_mounts() -> list[tuple[Path, Path]]:
    """(mount point, backing image) of every loop-mounted filesystem this process can see."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        source = right.split()[1] if len(right.split()) > 1 else ""
        if not source.startswith("/dev/loop"):
            continue
        try:
            backing = Path(f"/sys/block/{source[5:]}/loop/backing_file").read_text().strip()
        except OSError:
            continue
        point = left.split()[4].replace("\\040", " ")
        found.append((Path(point), Path(backing.removesuffix(" (deleted)"))))
    return found


def mounted_under(folder: Path) -> list[Path]:
    """The loop-mounted volumes inside `folder` (a search's run folder: empty once it is done)."""
    folder = Path(folder).resolve()
    return [point for point, _ in _loop_mounts() if point.is_relative_to(folder)]


def free_under(folder: Path, wait_s: float = 10.0) -> None:
    """Unmount the volumes left in `folder` by processes that are gone or going (a pool's workers
    after its shutdown, their runs cancelled and their warm slots unused): nothing of a run outlives
    the search. Waits up to `wait_s` for the owners to exit."""
    import time

    deadline = time.monotonic() + wait_s
    while os.geteuid() == 0 and mounted_under(folder) and time.monotonic() < deadline:
        reap_orphans()
        time.sleep(0.1)


def reap_orphans() -> list[Path]:
    """Unmount the volumes of processes that died without closing them (a worker killed with -9),
    and delete their images; returns the folders freed. Only volumes made by this module (named
    `.<folder>.<pid>-<hex>.img` beside their folder) whose owner no longer exists are touched."""
    freed = []
    for point, image in _loop_mounts():
        # Beside its folder, or a warm slot's (env/warm.py) shown at a run's workdir by a bind mount.
        beside = image.parent == point.parent and image.name.startswith(f".{point.name}.")
        match = re.fullmatch(r"\..+\.(\d+)-[0-9a-f]{8}\.img", image.name)
        if match is None or not (beside or image.parent.name == ".warm") or Path(f"/proc/{match.group(1)}").exists():
            continue
        try:
            unmount(point)
        except OSError:
            continue
        image.unlink(missing_ok=True)
        freed.append(point)
    return freed


class Workspaces:
    """The volumes a sandbox mounted over its runs' workdirs, by path, until `release`. `run` leaves a
    workdir mounted (its outputs are read, and a second command may run there); a second `mount` of
    the same workdir reuses its volume. Whatever is still mounted at exit is closed then."""

    def __init__(self) -> None:
        self._volumes: dict[Path, Volume] = {}
        self._lock = threading.Lock()
        atexit.register(self.close_all)
        if os.geteuid() == 0:
            reap_orphans()

    def mount(self, workdir: Path, size_mb: int, owner: tuple[int, int] | None = None) -> Volume:
        workdir = Path(workdir).resolve()
        with self._lock:
            volume = self._volumes.get(workdir)
            if volume is None or not volume.mounted:
                volume = mount_over(workdir, size_mb, owner)
                if volume.mounted:
                    self._volumes[workdir] = volume
            return volume

    def adopt(self, workdir: Path, volume) -> None:
        """Keep a volume mounted by someone else (a warm slot's) for `workdir`, until `release`."""
        with self._lock:
            self._volumes[Path(workdir).resolve()] = volume

    def release(self, workdir: Path, keep: bool = False) -> None:
        with self._lock:
            volume = self._volumes.pop(Path(workdir).resolve(), None)
        if volume is not None:
            unmount_keeping(volume) if keep else volume.close()

    def close_all(self) -> None:
        with self._lock:
            volumes, self._volumes = list(self._volumes.values()), {}
        for volume in volumes:
            try:
                volume.close()
            except OSError:
                pass


@functools.cache
def volume_support() -> str:
    """One line: whether this machine can cap a workspace (a throwaway 16 MB volume, once)."""
    with tempfile.TemporaryDirectory(prefix="speedsearch-volume-probe-") as tmp:
        volume = Volume(Path(tmp) / "probe", 16)
        volume.close()
    return "loop ext4" if volume.kind.startswith("loop") else volume.kind
