"""The runner image, assembled locally (no registry is needed, or reachable on many clusters).

The image holds almost nothing: /etc/passwd and /etc/group with an unprivileged user, /tmp, and the
same top-level symlinks as the host (/bin -> usr/bin, ...). At run time the host's system
directories and the Python installation (which holds torch and the other packages) are bind-mounted
read-only at the same paths (`host_mounts`), so a candidate runs with exactly the host's interpreter
and libraries, and the image never goes stale when packages change. This assumes the daemon runs on
this host (a local socket), which is how a worker uses it.
"""

from __future__ import annotations

import hashlib
import io
import os
import site
import sys
import tarfile

RUNNER_UID = 65534  # nobody: owns nothing on the host
RUNNER_GID = 65534
LAYOUT_LABEL = "speedsearch.layout"
_TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SYSTEM_DIRS = ("/usr",)
# What the loader, the shell and Python need from the host's /etc (not /etc itself: it holds secrets).
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
              "/etc/localtime", "/etc/nsswitch.conf", "/etc/mime.types")
_PASSWD = ("root:x:0:0:root:/root:/usr/sbin/nologin\n"
           f"nobody:x:{RUNNER_UID}:{RUNNER_GID}:nobody:/tmp:/usr/sbin/nologin\n")
_GROUP = f"root:x:0:\nnogroup:x:{RUNNER_GID}:\n"


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def host_mounts(extra: tuple[str, ...] = ()) -> list[str]:
    """Host paths to bind read-only at the same path: system dirs, loader config, the Python
    installation and its site-packages (a venv's, the user site), plus `extra`. Not the rest of
    sys.path: that may be a checkout (this project's, with its .env) that a candidate must not read."""
    mounts: list[str] = []
    sites = [*site.getsitepackages(), site.getusersitepackages()] if site.ENABLE_USER_SITE else \
        site.getsitepackages()
    candidates = [*_SYSTEM_DIRS, *(p for p in _TOP_LEVEL if not os.path.islink(p)), *_ETC_FILES,
                  sys.base_prefix, sys.prefix, *sites, *extra]
    for path in candidates:
        path = os.path.realpath(path)
        if os.path.exists(path) and not _under(path, mounts) and path != "/":
            mounts = [m for m in mounts if not _under(m, [path])] + [path]
    return mounts


def _layout() -> list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]:
    entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]] = []
    for name, mode in (("etc", 0o755), ("tmp", 0o1777), ("usr", 0o755), ("proc", 0o755), ("dev", 0o755),
                       ("sys", 0o755)):
        info = tarfile.TarInfo(name)
        info.type, info.mode = tarfile.DIRTYPE, mode
        entries.append(info)
    for path in _TOP_LEVEL:
        if os.path.islink(path):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
            entries.append(info)
    for name, text in (("etc/passwd", _PASSWD), ("etc/group", _GROUP)):
        data = text.encode()
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        entries.append((info, data))
    return entries


def layout_tar() -> tuple[bytes, str]:
    """The image's root filesystem as a tarball, and a hash of it (to notice a changed layout)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for entry in _layout():
            if isinstance(entry, tuple):
                tar.addfile(entry[0], io.BytesIO(entry[1]))
            else:
                tar.addfile(entry)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()[:16]


def ensure_image(client, image: str = "speedsearch-runner:latest") -> bool:
    """Make sure `image` exists; return True when it is an assembled image (run it with the host
    mounts), False when it is someone else's image (a target's own, with its own Python: run as is).

    An assembled image is (re)created when missing or when its layout changed; an image of that name
    without our label is never touched. Idempotent, and one API call when the image is there.
    """
    import docker

    data, digest = layout_tar()
    try:
        labels = client.images.get(image).labels or {}
        if LAYOUT_LABEL not in labels:
            return False
        if labels[LAYOUT_LABEL] == digest:
            return True
    except docker.errors.ImageNotFound:
        pass
    repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
    client.api.import_image_from_data(data, repository=repository, tag=tag,
                                      changes=[f"LABEL {LAYOUT_LABEL}={digest}", f"USER {RUNNER_UID}:{RUNNER_GID}",
                                               'CMD ["/bin/sh"]'])
    return True
