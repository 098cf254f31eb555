"""This machine's cache folder, and its data key: the secret the built-in targets' data is drawn from.

See env/data.py for how it travels (with each run spec, from the controller) and where it is used
(`{key}` in `data.path`: its fingerprint; the prepare step's environment: the key). A run never
sees it: the key's folder is private and hidden from every run.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

KEY_ENV = "SPEEDSEARCH_DATA_KEY"  # what the prepare step reads (search_space/targets/language.py)


def cache_dir() -> Path:
    """Where prepared data and compile caches live: $SPEEDSEARCH_CACHE or ~/.cache/speedsearch."""
    return Path(os.environ.get("SPEEDSEARCH_CACHE", Path.home() / ".cache" / "speedsearch"))


def keys_dir() -> Path:
    return cache_dir() / "keys"


def data_key() -> str:
    """This machine's data key (hex), made on first use: 32 random bytes in a private file."""
    folder = keys_dir()
    path = folder / "data.key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    tmp = folder / f".data.key.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    try:
        os.link(tmp, path)  # never replaces a key another process made first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


def key_id(key: str) -> str:
    """The key's fingerprint, for folder names: says which key, tells nothing of it."""
    return hashlib.sha256(b"speedsearch-data-key-id\0" + key.encode()).hexdigest()[:12]


def resolve_data_path(template: str, key: str = "") -> str:
    """`data.path` on this machine: `{cache}` its cache folder, `{key}` the fingerprint of the data key
    (`key`, the controller's where a run spec carries it, else this machine's own)."""
    path = template.replace("{cache}", str(cache_dir()))
    return path.replace("{key}", key_id(key or data_key())) if "{key}" in path else path
