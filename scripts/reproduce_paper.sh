#!/usr/bin/env bash
# Reproduce the paper's tables and figures: every experiment sweep in conf/experiment/ (or the named ones),
# then opd-exp-report on each, recording the wall time of every part.
#
# Usage:
#   scripts/reproduce_paper.sh                       # every paper table, then the estimator comparison, at the
#                                                    # default scale (tiny pairs, CPU), with the committed lrs
#   scripts/reproduce_paper.sh lr_tune               # re-tune the tables' lrs first (then edit conf/recipe/*.yaml)
#   scripts/reproduce_paper.sh math_main             # one experiment (several names are fine)
#   SCALE=smoke scripts/reproduce_paper.sh           # a 2-step run of every cell: checks the plumbing in minutes
#   SCALE=real NPROC=8 scripts/reproduce_paper.sh math_main      # the paper's pair and data on 8 GPUs (FSDP)
#   SCALE=real STUDENT_PATH=/models/Qwen2.5-7B-Instruct TEACHER_SERVER=http://teacher:8000 \
#     scripts/reproduce_paper.sh math_main                          # local student copy, teacher served by vLLM
#   LAUNCHER=basic scripts/reproduce_paper.sh        # one cell at a time (default: local_parallel at the
#                                                    # default and smoke scales, 2 cells x 1 torch thread)
#   DRY_RUN=1 scripts/reproduce_paper.sh             # print the commands only
#   scripts/reproduce_paper.sh estimators            # the estimator comparison alone, with the committed lrs
#   scripts/reproduce_paper.sh estimators_lr_tune estimators   # re-tune each objective's lr first (its report,
#                                                    # then scripts/set_estimator_lrs.py into conf/recipe/est/)
#
# Scales:
#   default  the experiment files as written: tiny pair (bootstrapped on first use), synthetic math, CPU.
#            Sweeps go to multirun/<experiment>/, reports to results/<experiment>/ (committed).
#   smoke    + train.steps=2, 8 eval prompts, a 1-layer pair: multirun/smoke/<experiment>/ and
#            outputs/smoke/results/<experiment>/ (not committed).
#   real     the paper's GPU recipe (Setup in shared/paper/PAPER.md): model=paper_math (Qwen2.5-7B-Instruct
#            student, OpenThinker3-7B teacher, hub ids; STUDENT_PATH / TEACHER_PATH point at local copies),
#            task=benchmark (DAPO-Math-17K train; MATH-500, AIME24, AIME25 (avg@32), Minerva, OlympiadBench: the
#            paper's five, AMC left out), bf16 on cuda, K = 32, 16 prompts x 8 rollouts a step, PPO mini-batch
#            64, lr 2e-6, no warm-up, 400 steps, 16384-token responses, top-p 0.9 and T = 1 for rollouts and
#            evaluation. BACKEND (default vllm) picks sampling.backend; TEACHER_SERVER (a `vllm serve
#            <teacher> --max-logprobs 32` URL) scores the teacher off the training GPUs (eval.teacher=false then).
#            NPROC > 1 runs each sweep under torchrun with the student sharded (train.parallel=fsdp), its cells
#            one after another on all NPROC GPUs (the paper: 8 H100s per run); NPROC=1 (default) runs cells with
#            LAUNCHER (e.g. slurm_gpu, one GPU per cell). Tables: math_main (T1), ablation_components (T3),
#            ablation_support (T4), ablation_k_topp (F6), failure_modes; not multitask (T2: the ALFWorld teacher
#            and task) nor the toy study (no model: its default-scale results stand). ablation_k_topp keeps its
#            recipes' K grid (sized for the tiny pair's vocabulary). Every method uses the paper's lr 2e-6, so
#            lr_tune is skipped. Sweeps go to multirun/real/<experiment>/, reports to results/real/<experiment>/.
#            Expected wall time and memory: the README's GPU recipe (estimates).
#
# Re-running the script resumes: finished cells are skipped, failed and interrupted ones are re-run. Timings
# are appended to <results root>/timings.tsv (experiment, part, seconds, exit code). `lr_tune` runs only when
# named; its chosen learning rates are written into conf/recipe/*.yaml by hand (with a comment naming the
# sweep), so re-run the other experiments after updating the recipes.
set -uo pipefail
cd "$(dirname "$0")/.."

SCALE="${SCALE:-default}"
# two cells at a time with one torch thread each on the CPU scales (conf/hydra/launcher/local_parallel.yaml);
# the real scale takes the launcher from LAUNCHER (e.g. slurm_gpu) or Hydra's basic one
if [ "$SCALE" = real ]; then LAUNCHER="${LAUNCHER:-}"; else LAUNCHER="${LAUNCHER:-local_parallel}"; fi
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"
NPROC="${NPROC:-1}"  # SCALE=real: GPUs per run (torchrun, the student sharded with FSDP2)

# ----------------------------------------------------------------------------- what to run
if [ "$#" -gt 0 ]; then
  EXPERIMENTS=("$@")
else
  # every paper table with the committed learning rates, then the estimator comparison as its own part; the lr
  # sweeps that chose those rates (lr_tune, estimators_lr_tune) run when named: they rewrite the recipes
  # mismatch_collapse before math_main: math_main's report embeds its evidence (results/math_main/collapse.md);
  # multitask before ablation_support_multitask: the latter's V1 cells are the former's Ours w/o mask (reuse)
  EXPERIMENTS=(mismatch_collapse)
  for f in conf/experiment/*.yaml; do
    name="$(basename "$f" .yaml)"
    case "$name" in lr_tune|mismatch_collapse|multitask|ablation_support_multitask|pair_seeds|estimators|estimators_lr_tune) ;;
      *) EXPERIMENTS+=("$name") ;; esac
  done
  # pair_seeds after the tables (its pair-0 cells are Table 1's, reused), then the estimator comparison: each is a
  # part of its own, outside the tables' 150-minute budget (README "Paper tables")
  EXPERIMENTS+=(multitask ablation_support_multitask pair_seeds estimators)
fi
if [ "$SCALE" = real ] && [ "$#" -eq 0 ]; then  # the paper's math tables; the paper's lr for every method
  EXPERIMENTS=(math_main ablation_components ablation_support ablation_k_topp failure_modes)
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
    SWEEP_ROOT=multirun/real; RESULTS_ROOT=results/real
    SCALE_OVERRIDES=(model=paper_math task=benchmark "~task.eval_splits.amc" model.dtype=bfloat16 device=cuda
      train.steps=400 train.prompts_per_step=16 sampling.rollouts_per_prompt=8 train.mini_batch_size=64
      train.lr=2.0e-6 train.warmup_steps=0 sampling.temperature=1.0 sampling.top_p=0.9
      sampling.max_new_tokens=16384 eval.temperature=1.0 eval.top_p=0.9 eval.max_new_tokens=16384
      eval.batch_size=32 "sampling.backend=${BACKEND:-vllm}")
    [ -n "${STUDENT_PATH:-}" ] && SCALE_OVERRIDES+=("model.student_path=$STUDENT_PATH")
    [ -n "${TEACHER_PATH:-}" ] && SCALE_OVERRIDES+=("model.teacher_path=$TEACHER_PATH")
    [ -n "${TEACHER_SERVER:-}" ] && SCALE_OVERRIDES+=("model.teacher_server=$TEACHER_SERVER" eval.teacher=false)
    [ "$NPROC" -gt 1 ] && SCALE_OVERRIDES+=(train.parallel=fsdp) ;;
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
  extra="${extra//+/}"
  echo "hydra.job.config.override_dirname.exclude_keys=[${base}${extra//\~/}]"
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

# One line of overrides per distinct pair the experiments train (their swept `model` values under their own
# task): "experiment=<name> [model=<value>]". Toy experiments train no pair.
pair_overrides() {
  "$PYTHON" - "$@" <<'PY'
import sys
from omegaconf import OmegaConf
seen = {}
for name in sys.argv[1:]:
    node = OmegaConf.load(f"conf/experiment/{name}.yaml")
    if str(node.get("runner", "opd")) != "opd":
        continue
    params = OmegaConf.select(node, "hydra.sweeper.params") or {}
    models = [m.strip() for m in str(params.get("model") or "").split(",")]
    # experiment=pair_seeds: one pair per bootstrap seed
    pair_seeds = [s.strip() for s in str(params.get("model.bootstrap.seed") or "").split(",")]
    task = next((str(d["override /task"]) for d in node.get("defaults") or []
                 if isinstance(d, dict) and "override /task" in d), "")
    for model in models:
        for pair_seed in pair_seeds:
            seen.setdefault((model, task, pair_seed), f"experiment={name}" + (f" model={model}" if model else "")
                            + (f" model.bootstrap.seed={pair_seed}" if pair_seed else ""))
print("\n".join(seen.values()))
PY
}

TOTAL_START=$SECONDS
# Every pair first, each on every core: a sweep's cells run with one thread each, and while the first cell
# bootstraps a pair the others wait for its lock, a core idle (the tiny pairs' weights do not depend on the thread
# count: the committed pair's sha256 is the same bootstrapped with 1 and 2 threads; the games pair sets its own,
# model.bootstrap.threads). A cached pair takes seconds.
if [ "$SCALE" != real ]; then
  while read -r line; do
    [ -n "$line" ] || continue
    read -ra pair_args <<< "$line"
    run_part pair "bootstrap ${line#experiment=}" "$PYTHON" -m opd_exp.check --pair-only "${pair_args[@]}" \
      "${SCALE_OVERRIDES[@]}"
  done < <(pair_overrides "${EXPERIMENTS[@]}")
fi
for name in "${EXPERIMENTS[@]}"; do
  args=("experiment=$name" "hydra.sweep.dir=$SWEEP_ROOT/$name")
  [ -n "$LAUNCHER" ] && [ "$LAUNCHER" != basic ] && args+=("hydra/launcher=$LAUNCHER")
  [ "$LAUNCHER" = local_parallel ] && args+=(threads=1)
  if [ "${#SCALE_OVERRIDES[@]}" -gt 0 ]; then
    args+=("${SCALE_OVERRIDES[@]}" "$(exclude_keys)")
    # K = 32 is the paper's support; F6's recipes set their own K, which a command-line value would override
    [ "$SCALE" = real ] && [ "$name" != ablation_k_topp ] && args+=(++estimator.top_k=32)
  fi
  if [ "$NPROC" -gt 1 ]; then  # every cell on all NPROC GPUs, one after another (Hydra's basic launcher)
    run_part "$name" sweep "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m opd_exp \
      "${args[@]}"
  else
    run_part "$name" sweep "$PYTHON" -m opd_exp "${args[@]}"
  fi
  case "$name" in
    toy_gamma|toy_exact) ;;  # one report for both toy sweeps, below
    mismatch_collapse)  # its evidence goes into Table 1's report (conf/experiment/math_main.yaml: include)
      mkdir -p "$RESULTS_ROOT/math_main"
      run_part "$name" evidence "$PYTHON" scripts/mismatch_collapse.py --sweep "$SWEEP_ROOT/$name" \
        --out "$RESULTS_ROOT/math_main/collapse.md" ;;
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
