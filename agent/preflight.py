"""What a search needs from outside, checked before anything is made: an API key for the llm
proposer, a Docker daemon for `--sandbox docker`, a Ray cluster at `--ray-address`.

Light on imports on purpose: the CLI runs these checks before it loads Ray, so a refusal comes
back in a moment.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from agent.settings import SearchSettings
from search_space.errors import UserError


def check_access(settings: SearchSettings) -> None:
    """What the search will need from outside, checked before anything is made: the API key for
    the llm proposer, a Docker daemon for --sandbox docker, a Ray cluster at --ray-address.
    Raises UserError naming the option."""
    if "llm" in settings.proposers and not os.environ.get("ANTHROPIC_API_KEY"):
        raise UserError("--proposers llm: needs an Anthropic API key; set ANTHROPIC_API_KEY "
                        "(or leave llm out of --proposers)")
    if settings.sandbox == "docker":
        try:
            from env.docker_sandbox import docker_client

            client = docker_client(timeout=5)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as e:  # the docker SDK raises several types for one cause: no daemon
            raise UserError(f"--sandbox docker: no Docker daemon answers ({first_line(e)}); start dockerd "
                            "or use --sandbox process") from None
    if settings.ray_address:
        _check_ray_address(settings.ray_address)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _check_ray_address(address: str, timeout_s: float = 3.0) -> None:
    """A Ray address (`host:port` or `ray://host:port`) must answer on its port; `auto` must find a
    cluster started on this machine. Ray itself would retry for a minute or more first."""
    if address == "auto":
        if not Path("/tmp/ray/ray_current_cluster").exists():
            raise UserError("--ray-address auto: no Ray cluster runs on this machine (start one with "
                            "`ray start --head`, or leave --ray-address out for a local one)")
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--ray-address {address}: expected host:port or ray://host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(f"--ray-address {address}: unreachable ({e.strerror or e})") from None


