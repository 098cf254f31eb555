#!/usr/bin/env bash
# tinygpt-gpu held to track rules on the GPU: honest runs must pass the rule probes (bf16 noise).
# Needs .wheels (as bench/gpu_run.sh). ATTACKS=1 also runs the two refused models.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD SPEEDSEARCH_CACHE=/tmp/sscache
out=${OUT:-/tmp/out}; mkdir -p $out
python3 - <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "tests")
src = Path("search_space/targets/tinygpt")
for name, rules in [("g1", 'pack = "speedrun-track1"\n'), ("g2", 'pack = "slowrun"\ndoc_separator = 0\neval_context = 1024\n')]:
    d = Path("/tmp") / name; d.mkdir(exist_ok=True)
    for f in ("train.py", "prepare.py", "model_server.py", "ideas.toml"):
        shutil.copy(src / f, d / f)
    t = (src / "target-gpu.toml").read_text()
    i = t.index("[[knobs]]")
    (d / "target.toml").write_text(t[:i] + "[rules]\n" + rules + "\n" + t[i:])
from test_track_rules import DOC_MASKED, STATEFUL
Path("/tmp/docmask.patch").write_text(DOC_MASKED)
Path("/tmp/stateful.patch").write_text(STATEFUL)
PY
ev() { name=$1; shift; python3 -m agent evaluate --fidelity smoke --json "$@" > $out/$name.json 2> $out/$name.err
  python3 -c "
import json,sys; r=json.load(open(sys.argv[1])); t=r['provenance'].get('trust',{})
print(sys.argv[2], r['status'], r['trust'], 'rules', t.get('rules'), 'probe', t.get('probe_max_change'), 'wall', round(r['wall_s'],1), r['reason'][:400])" $out/$name.json $name; }
ev track1_honest --target /tmp/g1
[ -n "${ATTACKS:-}" ] && ev track1_stateful --target /tmp/g1 --patch /tmp/stateful.patch
ev slowrun_docmask --target /tmp/g2 --patch /tmp/docmask.patch
[ -n "${ATTACKS:-}" ] && ev slowrun_plain --target /tmp/g2
nvidia-smi --query-gpu=name --format=csv,noheader
