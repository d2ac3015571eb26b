#!/usr/bin/env bash
# Runs the CPU forgetting experiments of docs/results/forgetting.md one after another, in pieces,
# so that days of CPU work survive kills, reboots and sessions:
#   1. cpu-order1  legal -> code -> medical            GAIN-FFN, LoRA r8, LoRA r1 (parameter-matched)
#   2. cpu-order2  code -> medical -> legal            GAIN-FFN, LoRA r8
#   3. cpu-long    legal -> code -> medical -> math -> religion   GAIN-FFN, LoRA r8
#   4. the extras (parameter-matched LoRA) of order 2, then of the long sequence.
#
# Usage: scripts/forgetting_queue.sh RUNS_DIR
#   RUNS_DIR gets one folder per preset (records, results.md, plots, log.txt), <preset>.out with
#   each piece's output, queue.log with one line per piece, and a lock refusing a second queue.
#   Rerun the same command after any stop: finished stages are skipped, a cut stage is redone.
# Environment: PIECE (minutes per piece, default 120), PYTHON (default: python3 on PATH).
#
# Run it from a copy of the code that nobody edits while it runs (every stage re-imports it):
#   git archive HEAD | (mkdir -p ../snapshot && tar -x -C ../snapshot)
#   cd ../snapshot && setsid nohup nice -n 10 scripts/forgetting_queue.sh ../runs > ../runs.out 2>&1 < /dev/null &
# The corpora and probe items must be fetched once first: python scripts/fetch_domains.py --probes
set -u
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 RUNS_DIR" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" || exit 1
RUNS=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
PIECE=${PIECE:-120}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Waiting OpenMP threads sleep instead of spinning: on a shared machine idle threads burn no core.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
cd "$ROOT" || exit 1
exec 9>"$RUNS/.queue.lock"
if ! flock -n 9; then echo "error: another queue runs in $RUNS (lock $RUNS/.queue.lock)" >&2; exit 1; fi

log() { echo "[$(date -u +%FT%TZ)] $*" >> "$RUNS/queue.log"; }

run_until_done() {  # PRESET PHASES: pieces of PIECE minutes until the schedule is complete
    local preset=$1 phases=$2 out=$RUNS/$1 fails=0 rc
    while true; do
        log "$preset ($phases): a piece of up to $PIECE min"
        "$PY" scripts/forgetting.py run --preset "$preset" --out "$out" --phases "$phases" \
            --stop-after "$PIECE" >> "$RUNS/$preset.out" 2>&1
        rc=$?
        "$PY" scripts/forgetting.py report --out "$out" >> "$RUNS/$preset.out" 2>&1 || log "$preset: report failed"
        case $rc in
            0) log "$preset ($phases): complete"; return 0 ;;
            3) fails=0 ;;  # --stop-after cut it: more to do
            *) fails=$((fails + 1)); log "$preset ($phases): exit $rc (failure $fails of 3)"
               if [ $fails -ge 3 ]; then log "$preset ($phases): giving up; see $RUNS/$preset.out"; return 1; fi
               sleep 60 ;;
        esac
    done
}

log "queue started ($(git -C "$ROOT" rev-parse HEAD 2>/dev/null || cat "$ROOT/SNAPSHOT" 2>/dev/null || echo "code of unknown commit"))"
run_until_done cpu-order1 fronts,seeds,probes
run_until_done cpu-order2 fronts,seeds,probes
run_until_done cpu-long fronts,seeds,probes
run_until_done cpu-order2 extras
run_until_done cpu-long extras
log "queue: everything done"
