#!/usr/bin/env bash
# One device call (issue #11): a packed search on a machine whose caches an earlier run filled (the compile
# cache persists per machine kind, so every search after a machine's first starts so). One base smoke run of
# the packed target fills the data and compile caches, then bench/gpu_share.sh with KEEP_CACHE=1.
# SRC_TAR (a tar.gz of the source to measure; default: this tree), PACK (8), CPUS (2), MEMORY_MB (12288),
# ALONE_RATE (2247.1 k tokens/s), MORE (more bench.gpu_share arguments, e.g. --smoke on), STOP_AFTER (430: the fill's minute must fit the call's 600 s too).
set -uo pipefail
[ -d /tmp/site/ray ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | tail -2
export SPEEDSEARCH_CACHE=/tmp/sscache-gpu-share
out=${OUT:-/tmp/out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
rm -rf "$SPEEDSEARCH_CACHE" /tmp/gsfill; mkdir -p /tmp/gsfill/src
if [ -n "${SRC_TAR:-}" ]; then tar -xzf "$SRC_TAR" -C /tmp/gsfill/src; else cp -r . /tmp/gsfill/src; fi
( cd /tmp/gsfill/src && export PYTHONPATH=/tmp/site:$PWD && t0=$(date +%s) && \
  python3 -c "from pathlib import Path; from bench.gpu_share import packed_target as p; \
p('tinygpt-gpu', Path('/tmp/gsfill/target'), ${PACK:-8}, ${CPUS:-2}, ${MEMORY_MB:-12288})" && \
  python3 -m bench.evaluate_runs --target /tmp/gsfill/target/target-gpu.toml --fidelity smoke --seeds 0 | cut -c1-200 && \
  echo "cache fill: $(( $(date +%s) - t0 )) s (data prepare + one cold base smoke run)" ) > "$out/fill.txt" 2>&1
tail -3 "$out/fill.txt"
KEEP_CACHE=1 NO_WHEELS=1 STOP_AFTER=${STOP_AFTER:-430} \
  EXTRA="--pack ${PACK:-8} --cpus ${CPUS:-2} --memory-mb ${MEMORY_MB:-12288} --alone-rate ${ALONE_RATE:-2247.1} ${MORE:-}" \
  bash bench/gpu_share.sh 2>&1 | tail -c 3000
