"""The built-in targets' data: a secret language drawn from the data key, which no run can read.

A corpus cut from text on the machine could be rebuilt inside a run (a red-team candidate did, and
trained on the held-out split). These tests hold the replacement to what it promises: the data is
a function of the key alone, the splits share no document, the prepare step refuses to run
without a key, the key is private and hidden from a real sandboxed run, and the folder a key
prepares is named by its fingerprint, never by the key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from env.data import KEY_ENV, data_key, data_root, ensure_data, hidden_paths, keys_dir
from env.evaluate import RunSpec, evaluate, make_sandbox
from search_space.cache import key_id
from search_space.target import load_target
from search_space.targets.language import Language
from tests.test_tinygpt import read_shard, shard_docs

TINYGPT = Path(__file__).resolve().parent.parent / "search_space" / "targets" / "tinygpt"
SLOWRUN = TINYGPT.parent / "slowrun"
KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))


def _prepare(folder: Path, out: Path, key: bytes | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    if key is not None:
        env[KEY_ENV] = key.hex()
    return subprocess.run([sys.executable, "prepare.py", "--out", str(out)], cwd=folder, env=env,
                          capture_output=True, text=True)


def test_a_key_draws_one_language_and_its_streams_share_no_document():
    lang = Language(KEY_A)
    again = Language(KEY_A).tokens("code", "train", 50_000, KEY_A)
    train = lang.tokens("code", "train", 50_000, KEY_A)
    assert np.array_equal(train, again) and len(train) == 50_000 and train[0] == 0
    dev = lang.tokens("code", "dev", 50_000, KEY_A)
    docs = [set(d for d in bytes(x.astype(np.uint8)).split(b"\0")[1:-1] if len(d) > 40) for x in (train, dev)]
    assert docs[0] and docs[1] and docs[0].isdisjoint(docs[1])
    prose = lang.tokens("prose", "train", 50_000, KEY_A)
    assert (train == 10).sum() > 2 * (prose == 10).sum()  # code has lines; prose, paragraphs


def test_another_key_is_another_language():
    a = Language(KEY_A).tokens("code", "train", 200_000, KEY_A)
    b = Language(KEY_B).tokens("code", "train", 200_000, KEY_B)
    # the printable alphabets are secret permutations: one key's byte frequencies tell little of another's
    fa, fb = (np.bincount(x, minlength=256)[33:127] for x in (a, b))
    assert np.corrcoef(fa, fb)[0, 1] < 0.5
    words_a = set(bytes(a.astype(np.uint8)).split())
    words_b = set(bytes(b.astype(np.uint8)).split())
    common = {w for w in words_a & words_b if len(w) >= 4}
    assert len(common) < 0.01 * len(words_a), sorted(common)[:20]


def test_prepare_writes_both_targets_folders_once_and_refuses_without_a_key(tmp_path: Path):
    refused = _prepare(TINYGPT, tmp_path / "none", None)
    assert refused.returncode != 0 and KEY_ENV in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "none").exists() and not list(tmp_path.iterdir())
    out = tmp_path / "slowrun"
    assert _prepare(SLOWRUN, out, KEY_A).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["DONE", "guard", "heldout", "run"]
    assert sorted(p.name for p in (out / "run").iterdir()) == ["train_code.bin", "train_text.bin"]
    for private in ("heldout", "guard"):
        assert (out / private).stat().st_mode & 0o077 == 0  # only its owner (the host) may read it
    assert len(read_shard(out / "run" / "train_code.bin")) == 2**16  # the budget, exactly
    train = set(shard_docs([out / "run" / "train_code.bin"])[:-1])
    held = set(shard_docs([out / "heldout" / "val_000.bin"])[1:-1])
    assert held and train.isdisjoint(held)
    mtime = (out / "run" / "train_code.bin").stat().st_mtime_ns
    again = _prepare(SLOWRUN, out, KEY_A)
    assert "nothing to do" in again.stdout and (out / "run" / "train_code.bin").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_the_key_is_private_its_fingerprint_names_the_folder_and_runs_do_not_see_it(tmp_path: Path):
    key = data_key()
    assert data_key() == key and len(bytes.fromhex(key)) == 32
    assert keys_dir().stat().st_mode & 0o077 == 0 and (keys_dir() / "data.key").stat().st_mode & 0o077 == 0
    target = load_target("tinylm-bpb")
    root = data_root(target)
    assert root.name.endswith(key_id(key)) and key not in str(root)
    assert data_root(target, KEY_B.hex()) != root  # another controller's key: another folder
    ensure_data(target)
    assert keys_dir() in hidden_paths(target) and root / "heldout" in hidden_paths(target)
    # a real sandboxed run of a candidate that looks for the key and the held-out split everywhere it could be
    probe = (f"import os, pathlib\n"
             f"for p in [{str(keys_dir() / 'data.key')!r}, {str(root / 'heldout' / 'val_000.bin')!r},"
             f" {str(root / 'guard' / 'text_000.bin')!r}]:\n"
             f"    try:\n        open(p, 'rb').read(1); print('READ', p, flush=True)\n"
             f"    except OSError as e:\n        print('DENIED', p, type(e).__name__, flush=True)\n"
             f"print('ENV', os.environ.get({KEY_ENV!r}), flush=True)\n")
    anchor = "def build_optimizer(model):\n"
    patch = f"train.py\n<<<<<<< SEARCH\n{anchor}=======\n{probe}\n\n{anchor}>>>>>>> REPLACE\n"
    result = evaluate(RunSpec(target, seed=0, fidelity="smoke", patch=patch, run_id="keyprobe"),
                      make_sandbox("process"), tmp_path, keep_workdir=True)
    log = Path(result.log).read_text()
    assert log.count("DENIED") == 3 and "READ" not in log and "ENV None" in log, log[-3000:]
    assert result.status == "ok", result.reason  # an honest smoke run otherwise: the probe changed nothing
