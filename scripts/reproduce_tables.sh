#!/usr/bin/env bash
# Fill the Sketch_LVM Table 1 layout and the ZSE-SBIR table layout with our methods, then
# build the tables (markdown, LaTeX, CSV) with the published numbers beside ours.
#
#   pip install "zsbir[slurm]"                     # hydra-submitit-launcher
#   export ZSBIR_DATA=/datasets/zsbir              # Sketchy/, TUBerlin/, QuickDraw/ (docs/datasets.md)
#   PARTITION=gpu ACCOUNT=myproj scripts/reproduce_tables.sh
#
# One Hydra sweep: every method x dataset x seed is one SLURM job on one GPU
# (launcher=slurm_1gpu). This script waits for the jobs (run it in tmux/screen or in a
# small CPU job); it exits non-zero if any job failed, after building the tables from the
# jobs that finished. Re-running it resumes the same sweep folder: finished jobs only
# re-evaluate, interrupted ones resume from last.pt, failed ones are retried. Preempted or
# timed-out jobs are requeued by SLURM and resume from last.pt on their own.
#
# Settings (environment variables):
#   OUT        where runs and tables go                 (default: outputs/reproduce_tables)
#   METHODS    experiment presets, comma-separated      (default: dann,sake,dsn,sketch_lvm,puxim;
#              empty: no preset, the default composition)
#   DATASETS   data configs, comma-separated            (default: sketchy,sketchy_split2,tuberlin,quickdraw)
#   SEEDS      comma-separated                          (default: 1,2,3)
#   LAUNCHER   a configs/launcher option, or "none" to run the jobs one after another here
#   PARTITION, ACCOUNT, QOS   passed to the SLURM launcher
#   EXTRA      more overrides for every job, e.g. "logger=wandb logger.project=zsbir-tables"
#   DRY_RUN=1  print the commands instead of running them
set -euo pipefail

OUT=${OUT:-outputs/reproduce_tables}
METHODS=${METHODS-dann,sake,dsn,sketch_lvm,puxim}
DATASETS=${DATASETS:-sketchy,sketchy_split2,tuberlin,quickdraw}
SEEDS=${SEEDS:-1,2,3}
LAUNCHER=${LAUNCHER:-slurm_1gpu}
PYTHON=${PYTHON:-python}

overrides=("data=${DATASETS}" "seed=${SEEDS}" "paths.output_dir=${OUT}" "hydra.sweep.dir=${OUT}/sweep")
[[ -n "${METHODS}" ]] && overrides=("experiment=${METHODS}" "${overrides[@]}")
if [[ "${LAUNCHER}" != "none" ]]; then
  overrides+=("launcher=${LAUNCHER}")
  [[ -n "${PARTITION:-}" ]] && overrides+=("hydra.launcher.partition=${PARTITION}")
  [[ -n "${ACCOUNT:-}" ]] && overrides+=("hydra.launcher.account=${ACCOUNT}")
  [[ -n "${QOS:-}" ]] && overrides+=("hydra.launcher.qos=${QOS}")
fi
# shellcheck disable=SC2206  # EXTRA is a list of overrides separated by spaces
[[ -n "${EXTRA:-}" ]] && overrides+=(${EXTRA})

run() {
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

sweep_status=0
run "${PYTHON}" -m zsbir.train -m "${overrides[@]}" || sweep_status=$?

tables="${OUT}/tables"
if [[ -n "${DRY_RUN:-}" ]]; then
  run "${PYTHON}" -m zsbir.report "${OUT}/sweep" --layout "<layout>" --format "<format>"
  exit 0
fi
mkdir -p "${tables}"
# Notes (failed or re-run jobs) are printed once, with the overview table.
"${PYTHON}" -m zsbir.report "${OUT}/sweep" --layout runs --format md > "${tables}/runs.md" || exit 1
for layout in sketch_lvm_table1 zse_sbir runs; do
  for format in md latex csv; do
    if text=$("${PYTHON}" -m zsbir.report "${OUT}/sweep" --layout "${layout}" --format "${format}" 2>/dev/null); then
      printf '%s\n' "${text}" > "${tables}/${layout}.${format/latex/tex}"
    else
      echo "no ${layout} table: no finished runs for its datasets" >&2
      break
    fi
  done
done
echo "tables in ${tables}/:"
ls "${tables}"
cat "${tables}/runs.md"
exit "${sweep_status}"
