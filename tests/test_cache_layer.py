"""The compile cache (env/cache_layer.py): a base run fills the shared folder; a candidate's run reads
it through an overlay of its own and cannot change it, cold or from a warm slot, in the process and
the Docker sandbox; nothing of the overlay outlives the run."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from env.cache_layer import machine_kind, shared_cache
from env.process_sandbox import ProcessSandbox
from env.sandbox import Limits, SandboxRequest

PROBE = textwrap.dedent('''
    import json, os, sys
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    seen = open(os.path.join(cache, "kernel")).read()
    writes = {}
    for name, mode in (("kernel", "w"), ("new-" + sys.argv[1], "w")):
        try:
            open(os.path.join(cache, name), mode).write("planted by " + sys.argv[1])
            writes[name] = "ok"
        except OSError as e:
            writes[name] = type(e).__name__
    try:
        os.remove(os.path.join(cache, "kernel"))
        writes["remove"] = "ok"
    except OSError as e:
        writes["remove"] = type(e).__name__
    print(json.dumps({"seen": seen, "writes": writes, "cache": cache}), flush=True)
''')


def _mounts_under(folder: Path) -> list[str]:
    folder = str(folder.resolve())
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(folder)]


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    cache = tmp_path / "shared-cache"
    (cache / "inductor").mkdir(parents=True)
    (cache / "triton").mkdir()
    (cache / "inductor" / "kernel").write_text("the base's kernel")
    return cache


def _request(root: Path, name: str, cache: Path, write: bool) -> SandboxRequest:
    work = root / "runs" / name / "work"
    work.mkdir(parents=True)
    (work / "probe.py").write_text(PROBE)
    return SandboxRequest(f"python3 probe.py {name}", work, root / "runs" / name / "run.log",
                          limits=Limits(timeout_s=60), cache_dir=cache, cache_write=write, warm=True)


def _run(box, req: SandboxRequest) -> dict:
    lines: list[str] = []
    out = box.run(req, on_line=lambda line: lines.append(line) and False)
    assert out.exit_code == 0, Path(req.log_path).read_text()
    seen = next(json.loads(line) for line in lines if line.startswith("{"))
    return {**seen, "start": out.containment.get("start", "cold")}


def _slot_started(box: ProcessSandbox, warm: bool) -> None:
    """Wait until the slot for the next run is started and ready (it starts beside the run before)."""
    if not warm:
        return
    deadline = time.monotonic() + 30
    while box._slot is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert box._slot is not None and box._slot.wait_ready(30)


@pytest.mark.parametrize("warm", [False, True])
def test_a_candidate_reads_the_shared_cache_but_cannot_change_it(tmp_path: Path, shared: Path, warm: bool):
    box = ProcessSandbox(warm=warm)
    try:
        for name in ("c1", "c2", "c3"):  # with warm slots, the second and third come from a slot
            _slot_started(box, warm and name != "c1")
            req = _request(tmp_path, name, shared, write=False)
            seen = _run(box, req)
            assert seen["seen"] == "the base's kernel"  # it reads what the base compiled
            assert seen["writes"] == {"kernel": "ok", f"new-{name}": "ok", "remove": "ok"}  # in its own layer
            assert not seen["cache"].startswith(str(shared))
            assert seen["start"] == ("warm slot" if warm and name != "c1" else "cold")
            box.release(req.workdir)
            assert (shared / "inductor" / "kernel").read_text() == "the base's kernel"
            assert sorted(p.name for p in (shared / "inductor").iterdir()) == ["kernel"]
            assert not _mounts_under(tmp_path / "runs" / name)
        _slot_started(box, warm)
    finally:
        box.close()
    assert not _mounts_under(tmp_path)  # no overlay, no volume, not even a waiting slot's


def test_a_base_run_fills_the_shared_cache(tmp_path: Path, shared: Path):
    box = ProcessSandbox()
    req = _request(tmp_path, "base", shared, write=True)
    seen = _run(box, req)
    box.release(req.workdir)
    assert seen["writes"]["new-base"] == "ok"
    assert (shared / "inductor" / "new-base").read_text() == "planted by base"
    assert not _mounts_under(tmp_path)


def test_the_next_candidate_does_not_see_the_last_ones_writes(tmp_path: Path, shared: Path):
    box = ProcessSandbox(warm=True)
    try:
        first = _request(tmp_path, "first", shared, write=False)
        _run(box, first)
        box.release(first.workdir)
        second = _request(tmp_path, "second", shared, write=False)
        seen = _run(box, second)  # the kernel the first planted (in its own layer) is not there
        assert seen["seen"] == "the base's kernel"
        box.release(second.workdir)
    finally:
        box.close()


def test_docker_candidate_gets_an_overlay_too(tmp_path: Path, shared: Path):
    from env.docker_sandbox import DockerSandbox

    box = DockerSandbox()
    req = _request(tmp_path, "dock", shared, write=False)
    seen = _run(box, req)
    box.release(req.workdir)
    assert seen["seen"] == "the base's kernel"
    assert seen["writes"]["new-dock"] == "ok"
    assert sorted(p.name for p in (shared / "inductor").iterdir()) == ["kernel"]
    assert (shared / "inductor" / "kernel").read_text() == "the base's kernel"
    assert not _mounts_under(tmp_path)


def test_the_shared_folder_is_keyed_by_machine_kind_not_by_node(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SPEEDSEARCH_CACHE", str(tmp_path / "c"))
    kind = machine_kind()
    assert "torch" in kind and "/" not in kind
    assert shared_cache() == tmp_path / "c" / "compile" / kind
    assert (shared_cache() / "inductor").is_dir() and (shared_cache() / "triton").is_dir()
