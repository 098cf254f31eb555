#!/usr/bin/env bash
# One device call (issue #11): a fixed-budget search on tinygpt-gpu with nvidia-smi sampled beside it, then
# where the held GPU time went (python -m bench.gpu_share). The cache folder starts empty, so the data
# prepare and the first cold compile fall inside the budget, as in the issue. Needs the wheels in .wheels/
# (see bench/gpu_run.sh). Writes $OUT/gpu-share.txt (the tables), $OUT/search.tar.gz (the search folder,
# for `python -m bench.gpu_share --analyze`) and the launch's own output.
# BUDGET (minutes, 6), DRAIN (minutes, 1.5: the call's time limit is below 6 + the default 4), STOP_AFTER
# (seconds before the search is stopped by Ctrl-C, 450), TARGET (tinygpt-gpu), NO_WHEELS=1 (installed packages).
# SRC_TAR=path.tar.gz (`git archive` plus this bench): measure that source, not a working tree other edits change;
# SRC_COMMIT names it in the output. EXTRA: more arguments for bench.gpu_share, e.g. packed runs:
#   EXTRA="--pack 4 --cpus 4 --memory-mb 24576 --alone-rate 2247.1" bash bench/gpu_share.sh
set -uo pipefail
[ -n "${NO_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | tail -2
out=${OUT:-/tmp/out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
if [ -n "${SRC_TAR:-}" ]; then
  src=$(mktemp -d /tmp/gssrc.XXXX); tar -xzf "$SRC_TAR" -C "$src"; cd "$src" || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD SPEEDSEARCH_CACHE=${SPEEDSEARCH_CACHE:-/tmp/sscache-gpu-share}
# KEEP_CACHE=1: the machine's caches (data, compile) stay from an earlier search: a machine's steady state
if [ -n "${KEEP_CACHE:-}" ]; then rm -rf /tmp/gpu-share "$SPEEDSEARCH_CACHE/runs"; else rm -rf "$SPEEDSEARCH_CACHE" /tmp/gpu-share; fi
{
  date -u; echo "source: ${SRC_COMMIT:-working tree} ($PWD)"; echo "extra: ${EXTRA:-none}; caches kept: ${KEEP_CACHE:-no}"; nproc
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$out/gpu-share.txt" 2>&1
python3 -m bench.gpu_share --target "${TARGET:-tinygpt-gpu}" --proposers ideas,knobs --budget-minutes "${BUDGET:-6}" \
  --drain-minutes "${DRAIN:-1.5}" --stop-after "${STOP_AFTER:-450}" --dir /tmp/gpu-share/search --runs ${EXTRA:-} \
  >> "$out/gpu-share.txt" 2>&1
rc=$?
echo "rc=$rc" >> "$out/gpu-share.txt"
cp /tmp/gpu-share/search.launch.err "$out/launch.err" 2>/dev/null
tar -czf "$out/search.tar.gz" -C /tmp/gpu-share --exclude '*.png' --exclude ./search/runs . 2>/dev/null
cat "$out/gpu-share.txt"
exit $rc
