#!/usr/bin/env bash
# One call on the GPU machine's host (16 cores): bench.loop at 64 logical workers and 1000 trials, with warm
# slots and with cold starts, side by side. Needs the wheels from shared/tools/gpu-wheelhouse.sh in .wheels/.
# MODES="warm" runs one of them; LOOP_TIMEOUT (s) bounds each run; DUMP_AFTER (s) prints every thread's
# stack once that long into a run (a run that hangs says where).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD SPEEDSEARCH_CACHE=/tmp/sscache
out=${OUT:-/tmp/out}; mkdir -p "$out"
{ date -u; nproc; python3 -c "from env.process_sandbox import containment_support; print(containment_support())"; } \
  > "$out/loop_host.txt" 2>&1
for mode in ${MODES:-warm cold}; do
  flag=""; [ "$mode" = cold ] && flag="--cold"
  file="$out/loop${flag:+-cold}.txt"
  timeout "${LOOP_TIMEOUT:-280}" python3 -m bench.loop --trials "${TRIALS:-1000}" --workers 64 --run-s 2 $flag \
    ${DUMP_AFTER:+--dump-after "$DUMP_AFTER"} > "$file" 2>&1
  echo "rc=$?" >> "$file"
done
