#!/usr/bin/env bash
# One call on the GPU machine (see bench/README.md): tinygpt-gpu full runs through `speedsearch evaluate`,
# the same under torchrun (tinygpt-ddp, --nproc_per_node=1), and the Ray pool with the real GPU.
# Needs the wheels from shared/tools/gpu-wheelhouse.sh in .wheels/. Writes $OUT/gpu_results.txt and logs.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD SPEEDSEARCH_CACHE=/tmp/sscache
out=${OUT:-/tmp/out}; mkdir -p "$out/logs"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$out/gpu_results.txt"
run() {  # name, then evaluate's arguments
  local name=$1; shift
  python3 -m agent evaluate "$@" --json > "$out/$name.json" 2> "$out/logs/$name.err"
  python3 - "$out/$name.json" "$name" >> "$out/gpu_results.txt" <<'PY'
import json, re, sys
d = json.load(open(sys.argv[1])); log = open(d["log"]).read()
open(sys.argv[1].replace(".json", ".log"), "w").write(log)
c = re.search(r"compile_and_warmup_s:([\d.]+)", log)
f = d["final"] or {}
steps, ms = f.get("steps", 0), f.get("train_ms", 0)
print(f"{sys.argv[2]}: status={d['status']} final_val_loss={f.get('val_loss')} train_ms={ms} steps={steps} "
      f"step_ms={ms / max(steps, 1):.2f} tokens_per_s={32 * 1024 * steps / max(ms, 1) * 1000:.0f} "
      f"compile_and_warmup_s={c.group(1) if c else '-'} wall_s={d['wall_s']:.1f} gpu={d['provenance'].get('gpu_model')} "
      f"{d['reason'][:300]}")
PY
}
run gpu_full_s0 --target tinygpt-gpu --seed 0 --fidelity full
run gpu_full_s1 --target tinygpt-gpu --seed 1 --fidelity full
run ddp_full_s0 --target tinygpt-ddp --seed 0 --fidelity full
[ -n "${SKIP_POOL:-}" ] || timeout 240 python3 -m bench.gpu_pool --target tinygpt-gpu --runs 2 >> "$out/gpu_results.txt" 2>&1
mv "$out"/*.log "$out/logs/" 2>/dev/null
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
cat "$out/gpu_results.txt"
