#!/usr/bin/env bash
# One call on the GPU machine (issue #10, section 5's H100 check): the speedrun-style trainer written
# here (bench/speedrun_style/train_gpt.py) made a target by `speedsearch init --from`, then run through
# `speedsearch evaluate` under torchrun: the base with an empty compile cache, the base again, a knob
# candidate (it reads the cache through its overlay). Needs the wheels of shared/tools/gpu-wheelhouse.sh
# in .wheels/. Writes $OUT/speedrun_style.txt (the table) and the runs' logs.
set -uo pipefail
if [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD
fi
export SPEEDSEARCH_CACHE=${SPEEDSEARCH_CACHE:-/tmp/sscache}
out=${OUT:-/tmp/out}; mkdir -p "$out"
rm -rf "$SPEEDSEARCH_CACHE/compile"
data=$(python3 -c "from env.data import ensure_data; from search_space.target import load_target as t; print(ensure_data(t('tinygpt')))")
sr=$(mktemp -d /tmp/speedrun-style.XXXX)
mkdir -p "$sr/data"; cp bench/speedrun_style/train_gpt.py "$sr/"
ln -sfn "$data" "$sr/data/tinygpt"; printf 'data/\n' > "$sr/.gitignore"
git -C "$sr" init -q && git -C "$sr" add . && git -C "$sr" -c user.name=b -c user.email=b@b commit -qm base
python3 -m agent init --from "$sr/train_gpt.py" > "$out/init.txt" 2>&1
sed -i "s/^startup_s = 600/startup_s = ${STARTUP_S:-120}/" "$sr/target.toml"
[ -z "${CPU_DRY:-}" ] || sed -i "s/^gpus = 1/gpus = 0/" "$sr/target.toml"  # a dry run of this script on a CPU machine
cp "$sr/target.toml" "$out/target.toml"
printf 'train_gpt.py\n<<<<<<< SEARCH\n    lr: float = 3e-3\n=======\n    lr: float = 4e-3\n>>>>>>> REPLACE\n' > "$sr/lr.patch"
run() {  # name, then evaluate's arguments
  local name=$1; shift
  python3 -m agent evaluate --target "$sr" --seed 0 --fidelity "${FIDELITY:-full}" --json "$@" \
    > "$out/$name.json" 2> "$out/$name.err"
}
run cold
run warm
run lr --patch "$sr/lr.patch"
python3 - "$out" <<'PY' | tee "$out/speedrun_style.txt"
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
print(open(out / "init.txt").read().strip())
print(f"{'run':6} {'role':26} {'status':8} {'compile_s':>9} {'train_ms':>9} {'val_loss':>8} {'wall_s':>7}  reason")
first = None
for name, role in (("cold", "base, empty cache (writer)"), ("warm", "base again (writer)"),
                   ("lr", "candidate, lr knob (reader)")):
    try:
        d = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError) as e:
        print(f"{name:6} {role:26} no result: {e}; {(out / f'{name}.err').read_text()[-500:]}")
        continue
    if "error" in d:
        print(f"{name:6} {role:26} refused: {d['error']}")
        continue
    log = Path(d["log"]).read_text(errors="replace") if Path(d["log"]).is_file() else ""
    (out / f"{name}.log").write_text(log)
    c = re.search(r"compile_s:([\d.]+)", log)
    f = d.get("final") or {}
    compile_s = float(c.group(1)) if c else None
    first = first or (name == "cold" and compile_s)
    print(f"{name:6} {role:26} {d['status']:8} {compile_s if compile_s is not None else '-':>9} "
          f"{f.get('train_ms', '-'):>9} {f.get('val_loss', 0):8.4f} {d['wall_s']:7.1f}  {d['reason'][:160]}")
    if name == "cold":
        p = d["provenance"]
        print("  provenance:", {k: p.get(k) for k in ("gpu_model", "torch", "cuda", "node_id", "code_version")})
        print("  containment:", p.get("containment"), " command:", p.get("command"))
    if name != "cold" and first and compile_s:
        print(f"  compile: {compile_s:.1f} s = {100 * compile_s / first:.0f} % of the cold run's "
              f"(goal <= 25 %: {'PASS' if compile_s <= 0.25 * first else 'FAIL'})")
PY
# a call brings back few files: the runs' results and logs travel as one archive beside the table
(cd "$out" && tar -czf runs.tar.gz --remove-files ./*.json ./*.err ./*.log target.toml init.txt 2>/dev/null)
