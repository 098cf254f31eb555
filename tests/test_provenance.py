"""Provenance: the CUDA version where the package metadata has no local tag (the H100's torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# What the default index's CUDA wheel of torch 2.11 holds: its metadata says 2.11.0, version.py the rest.
VERSION_PY = "__version__ = '2.11.0+cu130'\ndebug = False\ncuda: Optional[str] = '13.0'\nhip: Optional[str] = None\n"


def test_cuda_comes_from_torch_version_file_without_importing_torch(tmp_path: Path):
    pkg = tmp_path / "torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('provenance must not import torch')\n")
    (pkg / "version.py").write_text(VERSION_PY)
    code = ("import json, sys; from env.provenance import machine; m = machine(); "
            "print(json.dumps({'cuda': m['cuda'], 'torch': m['torch'], 'imported': 'torch' in sys.modules}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent.parent)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got == {"cuda": "13.0", "torch": "2.11.0+cu130", "imported": False}
