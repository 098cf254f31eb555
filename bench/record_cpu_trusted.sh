#!/usr/bin/env bash
# Re-record tinygpt's CPU baseline noise through the trusted evaluator (bench/verdict.py and
# bench/ladder_cost.py read it).
#   bash bench/record_cpu_trusted.sh [N_CONSECUTIVE=16] [N_PAIRS=12]
# Each run is what `speedsearch evaluate --target tinygpt --fidelity full --seed N --json` prints,
# made by `python -m bench.evaluate_runs` (the same calls, without the CLI). SNAP=<dir> runs it from
# a copy of search_space/ and env/ (a tree other sessions edit meanwhile cannot break a recording).
# Writes bench/results/tinygpt-cpu-trusted-consecutive-<date>.jsonl (seeds 0.. one after the other)
# and bench/results/tinygpt-cpu-trusted-pairs-<date>.jsonl (pair k: two runs started together,
# seeds 100+2k and 101+2k; pairs one after another). One RunResult JSON object per line, in time
# order; lines starting with '#' are the header.
set -u
cd "$(dirname "$0")/.."
N=${1:-16}; P=${2:-12}; DAY=$(date -u +%F)
CONS=bench/results/tinygpt-cpu-trusted-consecutive-$DAY.jsonl
PAIRS=bench/results/tinygpt-cpu-trusted-pairs-$DAY.jsonl
if [ -n "${SNAP:-}" ]; then RUN=(env PYTHONPATH="$SNAP" python3 "$SNAP/evaluate_runs.py"); else RUN=(python3 -m bench.evaluate_runs); fi
CMD="python -m bench.evaluate_runs --target tinygpt --fidelity full --seeds N"
CODE="code: git $(git rev-parse --short HEAD) + working tree${SNAP:+ (copied to $SNAP at the start)}"
one() { "${RUN[@]}" --target tinygpt --fidelity full --seeds "$1"; }
{ echo "# tinygpt CPU baseline through the trusted evaluator, runs one after the other; $(date -u +%FT%TZ) on $(hostname), $(nproc) cores, machine shared with other sessions"
  echo "# command: $CMD   (= speedsearch evaluate --target tinygpt --fidelity full --seed N --json), N = 0..$((N-1)) in order; $CODE"
  echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"; } > "$CONS"
for s in $(seq 0 $((N-1))); do one "$s" >> "$CONS"; echo "consecutive seed $s done $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"; done
{ echo "# tinygpt CPU baseline through the trusted evaluator, pairs side by side (two runs started together, as a confirm pair on 2 workers); $(date -u +%FT%TZ) on $(hostname), $(nproc) cores, machine shared with other sessions"
  echo "# command: pair k = 0..$((P-1)), one pair after another: $CMD with N = 100+2k and N = 101+2k at once; a line's 'pair' field is k; $CODE"
  echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"; } > "$PAIRS"
tmp=$(mktemp -d)
for k in $(seq 0 $((P-1))); do
  one $((100+2*k)) > "$tmp/a" & pa=$!
  one $((101+2*k)) > "$tmp/b" & pb=$!
  wait "$pa" "$pb"
  for f in "$tmp/a" "$tmp/b"; do
    python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).read()); d['pair']=int(sys.argv[2]); print(json.dumps(d))" "$f" "$k" >> "$PAIRS"
  done
  echo "pair $k done $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
done
rm -rf "$tmp"
echo ALL DONE
