#!/usr/bin/env bash
# Several search workers sharing one Optuna study, then the study's best init as one adapter.
#
#   bash scripts/search_workers.sh ALIGN TRANSFER VAL.jsonl OUT_ROOT [WORKERS=2] [N_TRIALS=30] [-- SEARCH OPTIONS]
#
# The workers share OUT_ROOT/study.log (an Optuna journal file: safe for processes on one file system)
# and together complete N_TRIALS; each writes OUT_ROOT/worker-<i>. OUT_ROOT/best then holds the best
# trial of the whole study (it runs no trial of its own). Rerunning resumes the study.
#
# Across machines, give every worker the same RDB storage instead of the journal file, e.g.
#   loramigrate search --align A --transfer T --data V --n-trials 60 \
#       --storage postgresql://user:pass@db/optuna --study sql-adapter -o runs/sql/search-$(hostname)
set -euo pipefail

usage="usage: search_workers.sh ALIGN TRANSFER VAL.jsonl OUT_ROOT [WORKERS] [N_TRIALS] [-- SEARCH OPTIONS]"
align=${1:?$usage}
transfer=${2:?$usage}
data=${3:?$usage}
root=${4:?$usage}
shift 4
workers=2
trials=30
if [ $# -gt 0 ] && [ "$1" != "--" ]; then workers=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" != "--" ]; then trials=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi

mkdir -p "$root"
search() {  # search OUT_DIR: one worker on the shared study
  loramigrate -q search --align "$align" --transfer "$transfer" --data "$data" --n-trials "$trials" \
    --storage "$root/study.log" --study search "$@" "${options[@]}"
}
options=("$@")

echo "$workers workers, $trials trials in total; study in $root/study.log" >&2
pids=()
for i in $(seq 1 "$workers"); do
  search -o "$root/worker-$i" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ "$failed" -eq 0 ] || { echo "error: a worker failed (see above); rerun to resume the study" >&2; exit 1; }
search -o "$root/best"
echo "done: best init in $root/best (trials: $root/best/trials.csv)" >&2
