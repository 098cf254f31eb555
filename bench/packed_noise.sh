#!/usr/bin/env bash
# One device call (issue #11, point 4): the base's timing noise with PACK runs at once on one GPU
# (python -m bench.packed_noise: a solo run first, then WAVES waves of PACK trusted base runs through
# the Ray pool), for bench/verdict.py. Run after bench/gpu_share.sh on the same warm machine (its compile
# cache is then filled; SPEEDSEARCH_CACHE is the same folder). Needs the wheels in .wheels/.
# Writes $OUT/packed-noise.jsonl (+ .solo.json) and $OUT/packed-noise.txt.
# PACK (4), CPUS (4), WAVES (3), NO_WHEELS=1 (installed packages).
set -uo pipefail
[ -n "${NO_WHEELS:-}" ] || [ -d /tmp/site/ray ] || \
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | tail -2
out=${OUT:-/tmp/out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
export PYTHONPATH=/tmp/site:$PWD SPEEDSEARCH_CACHE=${SPEEDSEARCH_CACHE:-/tmp/sscache-gpu-share}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } > "$out/packed-noise.txt"
python3 -m bench.packed_noise --target tinygpt-gpu --pack "${PACK:-4}" --cpus "${CPUS:-4}" --memory-mb 24576 \
  --waves "${WAVES:-3}" --out "$out/packed-noise.jsonl" >> "$out/packed-noise.txt" 2>&1
rc=$?
echo "rc=$rc" >> "$out/packed-noise.txt"
cat "$out/packed-noise.txt"
exit $rc
