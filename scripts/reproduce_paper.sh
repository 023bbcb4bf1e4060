#!/usr/bin/env bash
# Reproduce the paper's tables and figures: every experiment sweep in conf/experiment/ (or the named ones),
# then opd-exp-report on each, recording the wall time of every part.
#
# Usage:
#   scripts/reproduce_paper.sh                       # every experiment at the default scale (tiny pair, CPU)
#   scripts/reproduce_paper.sh math_main             # one experiment (several names are fine)
#   SCALE=smoke scripts/reproduce_paper.sh           # a 2-step run of every cell: checks the plumbing in minutes
#   SCALE=real STUDENT_PATH=/models/Qwen2.5-7B-Instruct TEACHER_PATH=/models/OpenThinker3-7B \
#     DATASET_PATH=/data/dapo_math_17k.jsonl LAUNCHER=slurm_gpu scripts/reproduce_paper.sh math_main
#   LAUNCHER=basic scripts/reproduce_paper.sh        # one cell at a time (default: local_parallel at the
#                                                    # default and smoke scales, 2 cells x 1 torch thread)
#   DRY_RUN=1 scripts/reproduce_paper.sh             # print the commands only
#   scripts/reproduce_paper.sh estimators            # the estimator comparison alone: estimators_lr_tune, its
#                                                    # report, scripts/set_estimator_lrs.py, then estimators
#
# Scales:
#   default  the experiment files as written: tiny pair (bootstrapped on first use), synthetic math, CPU.
#            Sweeps go to multirun/<experiment>/, reports to results/<experiment>/ (committed).
#   smoke    + train.steps=2, 8 eval prompts, a 1-layer pair: multirun/smoke/<experiment>/ and
#            outputs/smoke/results/<experiment>/ (not committed).
#   real     the paper's GPU recipe (Setup in shared/paper/PAPER.md): a pretrained pair from STUDENT_PATH and
#            TEACHER_PATH (Hugging Face checkpoint dirs), bf16 on cuda, K = 32, 16 prompts x 8 rollouts a step,
#            PPO mini-batch 64, lr 2e-6, 400 steps, 16384-token responses, avg@32, prompts from DATASET_PATH
#            (JSONL of {question, answer}). Sweeps go to multirun/real/<experiment>/, reports to
#            results/real/<experiment>/. The paper used 8 H100s per run (FSDP, vLLM rollouts): this suite's
#            loop is single-device, so a 7B pair needs one large GPU per cell (LAUNCHER=slurm_gpu) and days.
#            ablation_k_topp keeps its recipes' K grid (sized for the tiny pair's 30-token vocabulary). Every
#            method uses the paper's lr 2e-6, so lr_tune is skipped at this scale.
#
# Re-running the script resumes: finished cells are skipped, failed and interrupted ones are re-run. Timings
# are appended to <results root>/timings.tsv (experiment, part, seconds, exit code). lr_tune runs first; its
# chosen learning rates are written into conf/recipe/*.yaml by hand (with a comment naming the sweep), so
# re-run the other experiments after updating the recipes.
set -uo pipefail
cd "$(dirname "$0")/.."

SCALE="${SCALE:-default}"
# two cells at a time with one torch thread each on the CPU scales (conf/hydra/launcher/local_parallel.yaml);
# the real scale takes the launcher from LAUNCHER (e.g. slurm_gpu) or Hydra's basic one
if [ "$SCALE" = real ]; then LAUNCHER="${LAUNCHER:-}"; else LAUNCHER="${LAUNCHER:-local_parallel}"; fi
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"

# ----------------------------------------------------------------------------- what to run
if [ "$#" -gt 0 ]; then
  EXPERIMENTS=()
  # the estimator comparison is one part: its lr tuning first (skipped at the real scale, as lr_tune is)
  for name in "$@"; do
    [ "$name" = estimators ] && [ "$SCALE" != real ] && EXPERIMENTS+=(estimators_lr_tune)
    EXPERIMENTS+=("$name")
  done
else
  # lr_tune first (it chooses the recipes' learning rates), then every other experiment file; the estimator
  # comparison last, as its own part (estimators_lr_tune, then estimators)
  EXPERIMENTS=(lr_tune)
  for f in conf/experiment/*.yaml; do
    name="$(basename "$f" .yaml)"
    case "$name" in lr_tune|estimators|estimators_lr_tune) ;; *) EXPERIMENTS+=("$name") ;; esac
  done
  EXPERIMENTS+=(estimators_lr_tune estimators)
fi
if [ "$SCALE" = real ] && [ "$#" -eq 0 ]; then  # no lr tuning at the real scale: the paper's lr for every method
  KEPT=()
  for name in "${EXPERIMENTS[@]}"; do case "$name" in lr_tune|estimators_lr_tune) ;; *) KEPT+=("$name") ;; esac; done
  EXPERIMENTS=("${KEPT[@]}")
fi
for name in "${EXPERIMENTS[@]}"; do
  [ -f "conf/experiment/$name.yaml" ] || { echo "no conf/experiment/$name.yaml" >&2; exit 2; }
done

# ----------------------------------------------------------------------------- scale
SCALE_OVERRIDES=()
case "$SCALE" in
  default)
    SWEEP_ROOT=multirun; RESULTS_ROOT=results ;;
  smoke)
    SWEEP_ROOT=multirun/smoke; RESULTS_ROOT=outputs/smoke/results
    SCALE_OVERRIDES=(train.steps=2 train.prompts_per_step=2 train.mini_batch_size=4
      sampling.rollouts_per_prompt=2 sampling.max_new_tokens=16 eval.max_new_tokens=16 task.n_eval=8
      task.n_train=64 eval.k=2 train.checkpoint_every=0
      "++model.bootstrap={teacher:{hidden_size:16,num_layers:1,num_heads:2,sft_steps:2},student:{hidden_size:16,num_layers:1,num_heads:2,sft_steps:2,sft_examples:16},eval_examples:4,progress:false}") ;;
  real)
    : "${STUDENT_PATH:?SCALE=real needs STUDENT_PATH (student checkpoint dir, e.g. Qwen2.5-7B-Instruct)}"
    : "${TEACHER_PATH:?SCALE=real needs TEACHER_PATH (teacher checkpoint dir, e.g. OpenThinker3-7B)}"
    : "${DATASET_PATH:?SCALE=real needs DATASET_PATH (JSONL of {question, answer}, e.g. DAPO-Math-17K)}"
    SWEEP_ROOT=multirun/real; RESULTS_ROOT=results/real
    SCALE_OVERRIDES=(model.kind=pretrained model.name=qwen2.5-7b_openthinker3-7b
      "model.student_path=$STUDENT_PATH" "model.teacher_path=$TEACHER_PATH" model.dtype=bfloat16 device=cuda
      "task.dataset_path=$DATASET_PATH" train.steps=400 train.prompts_per_step=16
      sampling.rollouts_per_prompt=8 train.mini_batch_size=64 train.lr=2.0e-6 sampling.max_new_tokens=16384
      eval.max_new_tokens=16384 eval.k=32 eval.batch_size=32) ;;
  *)
    echo "SCALE must be default, smoke or real (got '$SCALE')" >&2; exit 2 ;;
esac

# Cells stay named by the experiment's own swept keys: the scale's keys are left out of the sub-dir names
# (they are the same for every cell of the sweep dir, and long values would exceed the file-name limit).
exclude_keys() {
  local base
  base="$("$PYTHON" -c "from omegaconf import OmegaConf; print(','.join(OmegaConf.load('conf/config.yaml').hydra.job.config.override_dirname.exclude_keys))")"
  local extra=""
  for o in "${SCALE_OVERRIDES[@]}"; do
    case ",$base$extra," in *",${o%%=*},"*) ;; *) extra+=",${o%%=*}" ;; esac
  done
  echo "hydra.job.config.override_dirname.exclude_keys=[${base}${extra//+/}]"
}

# ----------------------------------------------------------------------------- run
TIMINGS="$RESULTS_ROOT/timings.tsv"
[ "$DRY_RUN" = 1 ] || mkdir -p "$RESULTS_ROOT"
[ "$DRY_RUN" = 1 ] || [ -f "$TIMINGS" ] || printf 'experiment\tpart\tseconds\texit_code\tscale\tdate\n' > "$TIMINGS"

run_part() {  # run_part <experiment> <part> <command...>: run, time and record one part
  local name="$1" part="$2"; shift 2
  echo "+ $*"
  [ "$DRY_RUN" = 1 ] && return 0
  local start=$SECONDS
  "$@"
  local code=$?
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$part" "$((SECONDS - start))" "$code" "$SCALE" "$(date -Iseconds)" \
    >> "$TIMINGS"
  echo "[reproduce_paper] $name $part: $((SECONDS - start)) s (exit $code)"
}

TOTAL_START=$SECONDS
for name in "${EXPERIMENTS[@]}"; do
  args=("experiment=$name" "hydra.sweep.dir=$SWEEP_ROOT/$name")
  [ -n "$LAUNCHER" ] && [ "$LAUNCHER" != basic ] && args+=("hydra/launcher=$LAUNCHER")
  [ "$LAUNCHER" = local_parallel ] && args+=(threads=1)
  if [ "${#SCALE_OVERRIDES[@]}" -gt 0 ]; then
    args+=("${SCALE_OVERRIDES[@]}" "$(exclude_keys)")
    # K = 32 is the paper's support; F6's recipes set their own K, which a command-line value would override
    [ "$SCALE" = real ] && [ "$name" != ablation_k_topp ] && args+=(++estimator.top_k=32)
  fi
  run_part "$name" sweep "$PYTHON" -m opd_exp "${args[@]}"
  case "$name" in
    toy_gamma|toy_exact) ;;  # one report for both toy sweeps, below
    *) run_part "$name" report "$PYTHON" -m opd_exp.report.cli "$SWEEP_ROOT/$name" --out "$RESULTS_ROOT/$name" ;;
  esac
  # the estimator comparison: each objective's tuned lr into conf/recipe/est/ (at the default scale only; a
  # smoke run prints its choices without writing them)
  if [ "$name" = estimators_lr_tune ]; then
    set_lrs=("$PYTHON" scripts/set_estimator_lrs.py --table "$RESULTS_ROOT/$name/main.csv")
    [ "$SCALE" = default ] || set_lrs+=(--dry-run)
    run_part "$name" set_lrs "${set_lrs[@]}"
  fi
done
# the toy study's two sweeps share one report: results/toy/
TOY_SWEEPS=()
for name in toy_gamma toy_exact; do [ -d "$SWEEP_ROOT/$name" ] && TOY_SWEEPS+=("$SWEEP_ROOT/$name"); done
case " ${EXPERIMENTS[*]} " in
  *" toy_gamma "*|*" toy_exact "*)
    [ "${#TOY_SWEEPS[@]}" -gt 0 ] || [ "$DRY_RUN" = 1 ] && \
      run_part toy report "$PYTHON" -m opd_exp.report.cli "${TOY_SWEEPS[@]}" --out "$RESULTS_ROOT/toy" ;;
esac
echo "[reproduce_paper] done in $((SECONDS - TOTAL_START)) s; timings in $TIMINGS"
