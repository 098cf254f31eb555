#!/usr/bin/env bash
# The compile cache on a GPU machine (issue #10 section 5), one device call: cold against warm start-up
# through `speedsearch evaluate`, and the shared folder unchanged by candidates' runs.
#   cold:   the base (no --patch) with an empty cache; it fills the shared folder
#   warm:   the base again (a writer, the cache full)
#   lr:     a candidate whose patch keeps the graph (LEARNING_RATE): a reader, warm through its overlay
#   graph:  a candidate whose patch changes the graph (relu^2 for gelu): a reader that compiles cold
# Goal: warm compile_and_warmup_s <= 25 % of cold. Needs the wheels in .wheels/ (see bench/gpu_run.sh).
# Writes $OUT/compile_cache.txt (the table), $OUT/<run>.json and $OUT/<run>.log.
# SRC_TAR=path.tar.gz (from `git archive`): measure that source instead of the working tree, which
# other edits may be changing while the call is made; SRC_COMMIT names it in the output.
# NO_WHEELS=1: use the installed packages (a dry run on a machine without a GPU, TARGET=tinygpt).
set -uo pipefail
[ -n "${NO_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | tail -2
out=${OUT:-/tmp/out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
if [ -n "${SRC_TAR:-}" ]; then
  src=$(mktemp -d /tmp/ccsrc.XXXX); tar -xzf "$SRC_TAR" -C "$src"; cd "$src" || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD SPEEDSEARCH_CACHE=${SPEEDSEARCH_CACHE:-/tmp/sscache}
target=${TARGET:-tinygpt-gpu} fidelity=${FIDELITY:-smoke}
rm -rf "$SPEEDSEARCH_CACHE/compile"

# The patches: one keeps the model's graph (an optimiser constant), one changes it (the MLP's activation).
cat > "$out/lr.patch" <<'EOF'
train.py
<<<<<<< SEARCH
LEARNING_RATE = 1e-3  # AdamW peak learning rate
=======
LEARNING_RATE = 2e-3  # AdamW peak learning rate
>>>>>>> REPLACE
EOF
cat > "$out/graph.patch" <<'EOF'
train.py
<<<<<<< SEARCH
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))
=======
        return self.proj(F.relu(self.fc(x)).square())
>>>>>>> REPLACE
EOF

# What the shared folder holds: file count, bytes, sha256 of (path, size) and of (path, content).
snapshot() {
  python3 - "$1" <<'PY'
import hashlib, json, os, sys
from env.cache_layer import shared_cache
root = shared_cache()
names, contents, count, size = hashlib.sha256(), hashlib.sha256(), 0, 0
for dirpath, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for f in sorted(files):
        p = os.path.join(dirpath, f)
        rel, n = os.path.relpath(p, root), os.path.getsize(p)
        names.update(f"{rel}\0{n}\n".encode())
        contents.update(rel.encode() + b"\0" + open(p, "rb").read())
        count, size = count + 1, size + n
json.dump({"folder": str(root), "files": count, "bytes": size, "names_sizes": names.hexdigest()[:16],
           "contents": contents.hexdigest()[:16]}, open(sys.argv[1], "w"))
PY
}

{
  date -u; echo "source: ${SRC_COMMIT:-working tree} ($PWD), target $target, fidelity $fidelity"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$out/compile_cache.txt"

t=$(date +%s.%N)  # data prepared once, before the timed runs
python3 -c "from env.data import ensure_data; from search_space.target import load_target; print('data', ensure_data(load_target('$target')))" \
  >> "$out/compile_cache.txt" 2>&1
echo "data prepare: $(python3 -c "print(round($(date +%s.%N) - $t, 1))") s" >> "$out/compile_cache.txt"

runs=()
run() {  # name, role, then evaluate's extra arguments
  local name=$1 role=$2; shift 2
  snapshot "$out/$name.before.snap"
  # the overlays mounted while it runs (a reader's is mounted by the sandbox, in this mount namespace)
  : > "$out/$name.mounts"
  ( while :; do grep -h " overlay " /proc/mounts >> "$out/$name.mounts"; sleep 0.5; done ) &
  local sampler=$! t0; t0=$(date +%s.%N)
  timeout "${RUN_TIMEOUT:-150}" python3 -m agent evaluate --target "$target" --fidelity "$fidelity" --seed 0 --json "$@" \
    > "$out/$name.json" 2> "$out/$name.err"
  echo "$(date +%s.%N) - $t0" > "$out/$name.cli_s"
  kill -- "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  snapshot "$out/$name.after.snap"
  runs+=("$name:$role")
}
run cold "base (writer)"
run warm "base (writer)"
run lr "candidate, same graph (reader)" --patch "$out/lr.patch"
run graph "candidate, new graph (reader)" --patch "$out/graph.patch"

python3 - "$out" "${runs[@]}" >> "$out/compile_cache.txt" <<'PY'
import json, re, sys
out, runs = sys.argv[1], [r.split(":", 1) for r in sys.argv[2:]]
rows, compile_s, ok = [], {}, True
for name, role in runs:
    before = json.load(open(f"{out}/{name}.before.snap"))
    after = json.load(open(f"{out}/{name}.after.snap"))
    cli_s = eval(open(f"{out}/{name}.cli_s").read())
    try:
        d = json.load(open(f"{out}/{name}.json"))
    except (OSError, ValueError):
        rows.append((name, role, "-", "-", f"{cli_s:.1f}", "no JSON: " + open(f"{out}/{name}.err").read()[-300:],
                     before, after, {}))
        continue
    log = open(d["log"]).read()
    open(f"{out}/{name}.log", "w").write(log)
    c = re.search(r"compile_and_warmup_s:([\d.]+)", log)
    compile_s[name] = float(c.group(1)) if c else None
    rows.append((name, role, c.group(1) if c else "-", f"{d['wall_s']:.1f}", f"{cli_s:.1f}",
                 f"{d['status']} {(d.get('reason') or '')[:120]}", before, after,
                 d["provenance"].get("containment", {})))
print(f"\nfolder: {rows[0][6]['folder'] if rows else '-'}")
print(f"{'run':6} {'role':31} {'compile_s':>9} {'wall_s':>7} {'cli_s':>6}  {'files before -> after':22} "
      f"{'names+sizes before -> after':35} status")
for name, role, comp, wall, cli, status, b, a, _ in rows:
    print(f"{name:6} {role:31} {comp:>9} {wall:>7} {cli:>6}  {b['files']:>5} -> {a['files']:<5} ({a['bytes']:>9} B)  "
          f"{b['names_sizes']} -> {a['names_sizes']}  {status}")
print()
for name, role, *_, b, a, containment in rows:
    if "reader" in role:
        same = b["names_sizes"] == a["names_sizes"] and b["contents"] == a["contents"]
        ok &= same
        print(f"shared folder unchanged by {name} (names, sizes and contents): {'PASS' if same else 'FAIL'}")

for name, role, *_, b, a, containment in rows:  # overlays over this shared folder, seen while the run ran
    mounts = sorted({m.split()[1] for m in open(f"{out}/{name}.mounts").read().splitlines()
                     if f"lowerdir={b['folder']}," in m})
    print(f"overlay of the shared folder during {name} ({role}): {'yes, at ' + mounts[0] if mounts else 'none'}")
for name, *_, containment in rows:
    print(f"provenance.containment {name}: {json.dumps(containment)}")
cold, warm, lr = compile_s.get("cold"), compile_s.get("warm"), compile_s.get("lr")
for label, w in (("warm base", warm), ("warm candidate (overlay)", lr)):
    if cold and w is not None:
        verdict = "PASS" if w / cold <= 0.25 else "FAIL"
        ok &= verdict == "PASS"
        print(f"goal: {label} / cold compile_and_warmup_s <= 25 %: {w:.1f} / {cold:.1f} = {100 * w / cold:.0f} %  {verdict}")
    else:
        ok = False
        print(f"goal: {label} / cold <= 25 %: no figure  FAIL")
walls = {name: float(w) for name, _, _, w, *_ in rows if w != "-"}
if walls.get("cold") and walls.get("warm"):
    print(f"whole run wall_s, warm base / cold: {walls['warm']:.1f} / {walls['cold']:.1f} = {100 * walls['warm'] / walls['cold']:.0f} %")
graph = compile_s.get("graph")
if cold and graph is not None:
    print(f"candidate with a new graph: {graph:.1f} s = {100 * graph / cold:.0f} % of cold (it recompiles; its kernels stay in its own layer)")
sys.exit(0 if ok else 1)
PY
rc=$?  # 1 when a goal failed
cat "$out/compile_cache.txt"
# one archive for the per-run files (the device returns only a few files a call)
tar -czf /tmp/compile-cache-runs.tar.gz -C "$out" --exclude compile_cache.txt . \
  && find "$out" -type f ! -name compile_cache.txt -delete && mv /tmp/compile-cache-runs.tar.gz "$out/runs.tar.gz"
exit $rc
