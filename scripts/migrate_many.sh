#!/usr/bin/env bash
# Migrate every adapter in a folder to a recipe's new base, with one shared alignment.
#
#   bash scripts/migrate_many.sh RECIPE.yaml ADAPTERS_DIR RUN_ROOT [PARALLEL=1]
#
# Writes RUN_ROOT/align (once) and RUN_ROOT/<adapter>/ (transfer, search, finetune, eval, report.md).
# Resumable: rerun the same command after an interruption; finished stages are skipped.
# The first adapter runs alone (it computes the alignment); the rest run PARALLEL at a time.
#
# On a cluster, give each array task one adapter (the alignment must exist first, e.g. from a
# dependency job that runs the first adapter), for example with Slurm:
#   sbatch --array=0-99 --wrap 'a=(ADAPTERS_DIR/*/); loramigrate run RECIPE.yaml \
#       --adapter "${a[$SLURM_ARRAY_TASK_ID]}" --align-dir RUN_ROOT/align -o "RUN_ROOT/$(basename "${a[$SLURM_ARRAY_TASK_ID]}")"'
set -euo pipefail

recipe=${1:?usage: migrate_many.sh RECIPE.yaml ADAPTERS_DIR RUN_ROOT [PARALLEL]}
adapters=${2:?adapters folder}
root=${3:?run root}
parallel=${4:-1}

mapfile -t dirs < <(find "$adapters" -mindepth 1 -maxdepth 1 -type d -exec test -f '{}/adapter_config.json' ';' -print | sort)
if [ "${#dirs[@]}" -eq 0 ]; then
  echo "error: no PEFT adapter directories (with adapter_config.json) in $adapters" >&2
  exit 1
fi
mkdir -p "$root"

migrate() {  # one adapter → RUN_ROOT/<name>
  loramigrate -q run "$recipe" --adapter "$1" --align-dir "$root/align" -o "$root/$(basename "$1")"
}
export -f migrate
export recipe root

echo "migrating ${#dirs[@]} adapters; alignment in $root/align" >&2
migrate "${dirs[0]}"
if [ "${#dirs[@]}" -gt 1 ]; then
  printf '%s\0' "${dirs[@]:1}" | xargs -0 -n 1 -P "$parallel" bash -c 'migrate "$0"'
fi
echo "done: $root/*/report.md" >&2
