"""The Gymnasium-style view: reset() gives the task and code, step(patch) a bounded reward."""

from __future__ import annotations

from pathlib import Path

import pytest

from env.evaluate import make_sandbox
from env.rl import SpeedrunEnv
from tests.toy import make_toy, mode_patch


def test_reset_and_step(tmp_path: Path):
    toy = make_toy(tmp_path / "toy", sleep=0.02)
    env = SpeedrunEnv(toy, make_sandbox("process"), tmp_path / "runs", fidelity="full")
    with pytest.raises(RuntimeError, match="untrusted"):  # the toy has no [trust] evaluator
        env.reset(seed=0)
    env = SpeedrunEnv(toy, make_sandbox("process"), tmp_path / "runs", fidelity="full", allow_untrusted=True)
    obs, info = env.reset(seed=0)
    assert "train.py" in obs["files"] and "RATE = 1.0" in obs["files"]["train.py"]
    assert "reaches the target loss" in obs["task"] and info["target_loss"] > 1.0
    faster = "train.py\n<<<<<<< SEARCH\nRATE = 1.0\n=======\nRATE = 3.0\n>>>>>>> REPLACE\n"
    _, reward, terminated, _, info = env.step(faster)
    assert terminated and info["status"] == "ok"
    assert 0.5 < reward <= 1.0  # faster than the base, which would score 0.5
    _, reward, _, _, info = env.step(mode_patch("crash"))
    assert reward == 0.0 and info["status"] == "failed"
    frozen = 'target.toml\n<<<<<<< SEARCH\nname = "toy"\n=======\nname = "x"\n>>>>>>> REPLACE\n'
    _, reward, _, _, info = env.step(frozen)
    assert reward == 0.0 and info["status"] == "invalid"
    assert env.reward(env.baseline_value) == 0.5
