"""The run's typed config: one dataclass per Hydra config group, validated at start-up.

One source of defaults: ``RunConfig()`` equals the composed default ``conf/config.yaml`` (its groups
included); tests/test_config.py composes the YAML and compares, so the two cannot drift apart.

Users write flat YAML under ``conf/``; Hydra composes it; :func:`load_run_config` turns it into a
:class:`RunConfig` or raises :class:`~opd_exp.validation.ConfigError` naming the field, the value and the
allowed values. Field docs here are the reference for every YAML key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opd_exp.config.validation import ConfigError, spec, validate

ESTIMATOR_NAMES = ["sampled_token", "seq_rkl", "full_rkl", "forward_kl", "jsd", "topk_rkl", "seq_kd", "vopd",
                   "power_opd"]
RUNNER_NAMES = ["opd", "toy_gamma", "toy_exact"]
# the user turn of task=benchmark / task=champ: verl's math prompt, which the paper's verl-agent runs inherit
BENCHMARK_PROMPT = "{problem} Let's think step by step and output the final answer within \\boxed{}."


@dataclass
class EstimatorConfig:
    """Which distillation objective, and its knobs (each estimator reads the fields it needs)."""

    name: str = spec("topk_rkl", "estimator name", choices=ESTIMATOR_NAMES)
    gamma: float = spec(0.0, "discount of the reward-to-go: 0 token-level OPD, 1 sequence-level", ge=0.0, le=1.0)
    kl_form: str = spec("k1", "single-sample KL form of the per-token reward", choices=["k1", "k2", "k3"])
    reset_at_gaps: bool = spec(False, "with gamma > 0, restart the reward-to-go at each gap in the loss mask (the "
                               "official verl-agent code: a segment's return holds no later segment's rewards)")
    clip_eps: float = spec(0.2, "PPO clip range of the importance ratio", gt=0.0, le=10.0)
    clip_ratio_c: float | None = spec(None, "dual-clip PPO bound for negative advantages (verl: 3.0); null = off",
                                      gt=1.0)
    loss_agg: str = spec("token-mean", "how the per-token loss becomes a scalar (verl's loss_agg_mode): token-mean "
                         "(the text), seq-mean-token-mean (the official runs: micro-batch 1 + accumulation), "
                         "seq-mean-token-sum", choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
    baseline: str = spec("none", "baseline subtracted from the return", choices=["none", "mean"])
    top_k: int = spec(8, "support size K of topk_rkl (the paper: 32 at V = 152k; 8 on the tiny pair)", ge=1)
    support: str = spec("teacher", "whose top-K forms the support", choices=["teacher", "student"])
    add_sampled: bool = spec(False, "append the sampled token to the support when outside top-K")
    normalize: str = spec("renormalized", "renormalise both models over the support (renormalized), full "
                          "log-probs (none), or full log-probs in MOPD's unnormalised generalised KL "
                          "p (log p - log q) - p + q (unnormalized_gkl, arXiv 2606.30406 Eq. 5)",
                          choices=["renormalized", "none", "unnormalized_gkl"])
    tail: str = spec("none", "tail term outside the support: sampled_is (importance-weighted by the sampler's "
                     "log-probs, the paper's text), sampled_is_official (the official code's biased "
                     "sg(log p - log q) exp(lp - sg lp)), bucket (one tail bucket)",
                     choices=["none", "sampled_is", "sampled_is_official", "bucket"])
    beta: float = spec(0.5, "generalised JSD mixture weight: 0 forward KL, 1 reverse KL", ge=0.0, le=1.0)
    chunk_size: int = spec(1024, "positions per chunk for full-vocabulary losses", ge=1)
    vopd_value: str = spec("full", "where vopd's value baseline V_t = -KL_t(p || q) is computed: the full "
                           "vocabulary (full), or renormalised over pi_old's (student_topk, the paper's top-k "
                           "approximation) or the teacher's (teacher_topk) top_k ids",
                           choices=["full", "student_topk", "teacher_topk"])
    power_alpha: float = spec(5.0, "power_opd's Box-Cox exponent alpha > 0 (the official run script's 5; "
                              "alpha -> 0 recovers the log-ratio)", gt=0.0)
    power_rescale: bool = spec(True, "power_opd: divide the reward by alpha (Box-Cox, (q^a - pi_old^a)/a); "
                               "false = the official code's q^a - pi_old^a")
    entropy_top_q: float = spec(1.0, "train only on this fraction of highest-entropy tokens (1 = off)",
                                gt=0.0, le=1.0)
    iw_opd_weight_max: float = spec(1.0, "IW-OPD position reweighting of the token-level score-function "
                                    "objectives (arXiv 2606.22600): advantage weight 1 + (w_max - 1)(1 - F_{t-1}), "
                                    "F the cumulative |log q - log pi_old| share; the official run's 1.5; 1 = off",
                                    ge=1.0)
    topk_stop_grad: bool = spec(False, "topk_rkl with normalize=none: p_s (sg[log p_s] - log q) on the support "
                                "(arXiv 2605.11182's stop-gradient top-K; no grad P_s(S) term)")
    probe_every: int = spec(0, "gradient probe every this many steps (opd_exp/train/probe.py): every objective of "
                            "probe_objectives on the same rollouts; 0 = off", ge=0)
    probe_objectives: list[str] | None = spec(None, "conf/estimator/<name> presets the probe measures "
                                              "(null = every preset but seq_kd)")
    probe_micro_batches: int = spec(4, "micro-batches the probe splits its rollout batch into (variance)", ge=2)


@dataclass
class MaskConfig:
    """Special-token masking (part of the paper's fix): drop configured tokens from every loss term."""

    enabled: bool = spec(False, "apply special-token masking")
    tokens: list[Any] | None = spec(None, "token strings or ids to mask; null = the model pair's defaults")
    mode: str = spec("first", "mask the first occurrence per response or all", choices=["first", "all"])
    after_rejected: bool = spec(False, "multi-turn tasks: drop what follows an episode's first rejected action "
                                "from the loss (contexts a teacher trained on expert play never saw)")


@dataclass
class TaskConfig:
    """The prompt source and grader."""

    name: str = spec("math", "task name", choices=["math", "benchmark", "champ", "agentic", "math_agentic",
                                                   "scienceworld", "alfworld"])
    min_ops: int = spec(2, "fewest +/- operations in a training problem", ge=1)
    max_ops: int = spec(4, "most +/- operations in a training problem", ge=1)
    max_operand: int = spec(9, "operands are drawn from 0..max_operand", ge=1)
    data_seed: int = spec(1234, "seed of the train/eval split generator (independent of the run seed)", ge=0)
    n_train: int = spec(20000, "size of the training prompt pool", ge=1)
    n_eval: int = spec(200, "prompts per eval split", ge=1)
    eval_splits: dict = spec(default_factory=lambda: {"id": {}, "long": {"min_ops": 5, "max_ops": 5},
                                                      "wide": {"max_operand": 12}},
                              doc="math: name -> overrides of min_ops/max_ops/max_operand; benchmark: name -> "
                              "dataset spec {path, name, split, revision, k, problem_key, answer_key}")
    dataset_path: str | None = spec(None, "optional JSONL of {question, answer} rows instead of generated data")
    eval_set: str = spec("report", "report = the eval splits of the tables; tune = disjoint splits of the same "
                         "shape drawn after the train pool, for hyper-parameter tuning (generated data only)",
                         choices=["report", "tune"])
    # --- real benchmarks: task=benchmark, task=champ (opd_exp/tasks/benchmark.py, champ.py)
    train_data: dict = spec(default_factory=dict, doc="benchmark: training dataset spec {path (hub id or local "
                            ".jsonl/.json/.parquet), name, split, revision, problem_key, answer_key}")
    prompt_template: str = spec(BENCHMARK_PROMPT, "benchmark/champ: the user turn; {problem} is replaced by the "
                                "problem (other braces are literal)")
    system_prompt: str | None = spec(None, "benchmark/champ: a system turn before the user turn (null = none)")
    # the agentic task (opd_exp/tasks/agentic.py: TextWorld games) and the mix (opd_exp/tasks/mix.py)
    n_train_games: int = spec(256, "training games (the teacher's SFT data and the OPD prompt stream)", ge=1)
    n_eval_games: int = spec(50, "games per eval split", ge=1)
    game_rooms: int = spec(2, "rooms in a training game (a chain)", ge=1, le=10)
    game_receptacles: int = spec(2, "supporters/containers per room", ge=1, le=3)
    game_distractors: int = spec(2, "objects besides the quest's", ge=0, le=8)
    game_eval_splits: dict = spec(default_factory=lambda: {"id": {}, "hard": {"rooms": 3}},
                                  doc="name -> overrides of rooms/receptacles/distractors")
    game_workers: int = spec(2, "processes generating a game pool", ge=1)
    games_dir: str | None = spec(None, "game cache root; null = OPD_EXP_CACHE, else ~/.cache/opd_exp")
    max_turns: int = spec(8, "actions per episode", ge=1)
    max_action_tokens: int = spec(12, "tokens per action", ge=1)
    mix: dict = spec(default_factory=lambda: {"math": 1, "agentic": 1},
                     doc="task=math_agentic: batches per task in each round of the schedule (task -> int >= 0)")
    # external text games for real pairs (opd_exp/tasks/scienceworld.py, alfworld.py); n_train_games,
    # n_eval_games, max_turns and max_action_tokens above apply to them too
    env_tasks: list[str] | None = spec(None, "scienceworld: task names (null = all 30); alfworld: task types of "
                                       "pick_and_place_simple, look_at_obj_in_light, pick_clean_then_place_in_recep, "
                                       "pick_heat_then_place_in_recep, pick_cool_then_place_in_recep, "
                                       "pick_two_obj_and_place (null = all six)")
    env_eval_splits: list[str] | None = spec(None, "eval splits; scienceworld: of dev, test; alfworld: of "
                                             "eval_in_distribution, eval_out_of_distribution (null = both)")
    env_max_obs_chars: int = spec(1000, "scienceworld/alfworld: observations are cut at this many characters "
                                  "(tabs and blank lines dropped)", ge=20)
    env_list_actions: bool = spec(False, "alfworld: end each observation with the game's admissible actions (as "
                                  "verl-agent's ALFWorld prompts list them)")
    alfworld_data: str | None = spec(None, "alfworld: the dir alfworld-download filled (null = env ALFWORLD_DATA, "
                                     "else ~/.cache/alfworld)")


@dataclass
class ModelConfig:
    """A (teacher, student) pair: the embedded tiny pair (bootstrapped) or any two checkpoints on disk."""

    name: str = spec("tiny", "pair name, used in tables")
    kind: str = spec("tiny", "tiny = bootstrap in-repo models; pretrained = load two checkpoints",
                     choices=["tiny", "pretrained"])
    teacher_path: str | None = spec(None, "teacher checkpoint dir (kind=pretrained)")
    student_path: str | None = spec(None, "student checkpoint dir (kind=pretrained)")
    tokenizer_path: str | None = spec(None, "tokenizer dir; default: the student's")
    dtype: str = spec("float32", "parameter dtype", choices=["float32", "bfloat16", "float16"])
    special_tokens: list[Any] | None = spec(default_factory=lambda: ["<think>", "</think>", "<|im_end|>"],
                                            doc="default tokens for special-token masking; null = read from the "
                                            "pair (think delimiters in its vocabulary, its EOS and stop ids)")
    student_stop_tokens: list[Any] | None = spec(None, "tokens (strings or ids) that also end the student's "
                                                 "responses, in rollouts and evaluation, beside its generation "
                                                 "config's EOS (Qwen2.5-Instruct, the paper's student, stops on "
                                                 "both <|im_end|> and <|endoftext|>); null = that EOS alone")
    bootstrap: dict = spec(default_factory=dict, doc="tiny-pair bootstrap settings (see opd_exp.models.bootstrap)")
    teachers: dict = spec(default_factory=dict, doc="task name -> checkpoint dir of that task's own teacher (a "
                          "mix's rows are scored by their task's teacher); tasks not named use the pair's teacher")
    cache_dir: str = spec("~/.cache/opd_exp", "where bootstrapped pairs are cached (keyed by config hash)")
    # --- real pairs (opd_exp/models/pair.py): hub ids or local dirs, precision, memory, LoRA
    teacher_revision: str | None = spec(None, "hub revision of a teacher_path that is a hub id (null = main)")
    student_revision: str | None = spec(None, "hub revision of a student_path that is a hub id (null = main)")
    attn_implementation: str | None = spec(None, "transformers attention kernel (null = its default)",
                                           choices=["eager", "sdpa", "flash_attention_2"])
    gradient_checkpointing: bool = spec(False, "recompute the student's activations in the backward pass")
    lora_rank: int = spec(0, "LoRA rank of the student's adapters (peft; 0 = full fine-tuning)", ge=0)
    lora_alpha: float = spec(16.0, "LoRA scale numerator (scale = lora_alpha / lora_rank)", gt=0.0)
    lora_target_modules: list[str] | None = spec(None, "module names that get adapters (null = every linear "
                                                 "layer but the output head)")
    teacher_server: str | None = spec(None, "URL of a vLLM OpenAI-compatible server that scores the teacher "
                                      "(top-K prompt_logprobs; start it with --max-logprobs >= K): the teacher "
                                      "then never loads here (opd_exp/models/teacher_server.py); null = local")


@dataclass
class SamplingConfig:
    """Student rollout sampling during training."""

    temperature: float = spec(1.0, "softmax temperature", gt=0.0)
    top_p: float = spec(0.9, "nucleus mass kept (1 = full distribution)", gt=0.0, le=1.0)
    rollouts_per_prompt: int = spec(4, "rollouts sampled per prompt", ge=1)
    max_new_tokens: int = spec(64, "response length cap; longer rollouts are truncated", ge=1)
    backend: str = spec("decode", "rollout backend (opd_exp.rollout): decode = opd-exp's KV-cache loop (shared prompt "
                        "prefill, finished rows dropped), hf = transformers generate, vllm = a colocated vLLM engine "
                        "(extra [vllm], CUDA)", choices=["decode", "hf", "vllm"])


@dataclass
class TrainConfig:
    """The OPD loop."""

    steps: int = spec(150, "rollout batches (optimizer rounds)", ge=0)
    prompts_per_step: int = spec(16, "prompts per rollout batch", ge=1)
    mini_batch_size: int = spec(32, "trajectories per optimizer step (PPO mini-batch)", ge=1)
    ppo_epochs: int = spec(1, "passes over each rollout batch", ge=1)
    lr: float = spec(5e-4, "AdamW learning rate", gt=0.0)
    weight_decay: float = spec(0.0, "AdamW weight decay", ge=0.0)
    lr_schedule: str = spec("constant", "learning-rate schedule", choices=["constant", "cosine"])
    warmup_steps: int = spec(0, "linear warm-up steps", ge=0)
    max_grad_norm: float = spec(1.0, "gradient clipping norm", gt=0.0)
    eval_every: int = spec(0, "evaluate every N steps (0 = only before and after)", ge=0)
    checkpoint_every: int = spec(25, "checkpoint every N steps (0 = only at the end)", ge=0)
    log_every: int = spec(1, "write train metrics every N steps", ge=1)
    diag_every: int = spec(5, "log failure-mode diagnostics (diag/) every N steps (0 = off)", ge=0)
    diag_top_k: int = spec(32, "teacher top-K used by the diagnostics (capped at the vocabulary)", ge=1)
    max_nonfinite: int = spec(5, "consecutive non-finite updates before the run stops as diverged", ge=1)
    parallel: str = spec("ddp", "how torchrun's processes share the student: ddp = a whole copy per rank, "
                         "gradients averaged (opd_exp/train/distributed.py); fsdp = sharded over the ranks with "
                         "FSDP2 (opd_exp/train/fsdp.py; the teacher stays replicated); one process: ddp only",
                         choices=["ddp", "fsdp"])


@dataclass
class EvalConfig:
    """Held-out evaluation of teacher, student before and student after."""

    n_prompts: int | None = spec(None, "prompts per split (null = task.n_eval)", ge=1)
    k: int = spec(4, "samples per prompt for avg@k and pass@k", ge=1)
    temperature: float = spec(1.0, "sampling temperature for avg@k", gt=0.0)
    top_p: float = spec(0.9, "nucleus mass for avg@k (the paper evaluates at 0.9)", gt=0.0, le=1.0)
    max_new_tokens: int = spec(64, "response length cap at evaluation", ge=1)
    batch_size: int = spec(256, "prompts per generation batch", ge=1)
    teacher: bool = spec(True, "also evaluate the teacher")


@dataclass
class WandbConfig:
    """Optional Weights & Biases mirror of metrics.jsonl (imported only when enabled)."""

    enabled: bool = spec(False, "mirror metrics to wandb")
    project: str = spec("opd-exp", "wandb project")
    entity: str | None = spec(None, "wandb entity")
    mode: str = spec("offline", "wandb mode", choices=["online", "offline", "disabled"])
    group: str | None = spec(None, "run group (default: the experiment name)")


@dataclass
class RunConfig:
    """Everything one run needs."""

    # numpy's seeds stop at 2**32 - 1; 2**31 - 1 leaves room for the data-parallel offset seed + 100003 * rank
    seed: int = spec(0, "run seed (sampling, init of anything random)", ge=0, le=2**31 - 1)
    runner: str = spec("opd", "what the run does", choices=RUNNER_NAMES)
    experiment: str = spec("default", "experiment name (tables and wandb groups)")
    device: str = spec("auto", "torch device", choices=["auto", "cpu", "cuda"])
    threads: int = spec(0, "torch CPU threads (0 = torch default)", ge=0)
    overwrite: bool = spec(False, "re-run a finished run dir instead of skipping it")
    reuse: bool = spec(False, "copy a finished run with the same config and clean commit instead of training "
                       "(opd_exp/reuse.py; the paper tables' shared cells)")
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    toy: dict = spec(default_factory=dict, doc="toy-study settings (validated by opd_exp.toy)")
    report: dict = spec(default_factory=dict, doc="how opd-exp-report lays out this experiment's tables")


def check_estimator_switches(e: EstimatorConfig) -> None:
    """The top-K objective's switches must describe one estimator (arXiv 2603.25562, Table 4's V1-V5): checked
    at start-up, before any model is loaded or evaluated."""
    if e.tail != "none" and e.normalize == "renormalized":
        raise ConfigError("estimator.tail", f"got {e.tail!r} with estimator.normalize='renormalized'; a tail term "
                          "needs full-vocabulary log-probs: set estimator.normalize=none, or estimator.tail=none")
    if e.tail != "none" and e.normalize == "unnormalized_gkl":
        raise ConfigError("estimator.tail", f"got {e.tail!r} with estimator.normalize='unnormalized_gkl'; MOPD's "
                          "generalised KL (arXiv 2606.30406, Eq. 5) has no tail term (its -p + q terms already "
                          "account for the mass off the support): set estimator.tail=none")
    if e.tail.startswith("sampled_is") and e.add_sampled:
        raise ConfigError("estimator.add_sampled", f"got true with estimator.tail={e.tail!r}: the sampled token "
                          "would be counted both in the support and in the tail; set estimator.add_sampled=false")


def check_cross_fields(cfg: RunConfig) -> None:
    """Checks that involve several fields (those needing the vocabulary run after the models load)."""
    check_estimator_switches(cfg.estimator)
    if cfg.task.min_ops > cfg.task.max_ops:
        raise ConfigError("task.min_ops", f"got {cfg.task.min_ops}, must be <= task.max_ops ({cfg.task.max_ops})")
    batch = cfg.train.prompts_per_step * cfg.sampling.rollouts_per_prompt
    if cfg.runner == "opd" and batch % cfg.train.mini_batch_size:
        raise ConfigError(
            "train.mini_batch_size",
            f"got {cfg.train.mini_batch_size}, must divide the rollout batch "
            f"(train.prompts_per_step * sampling.rollouts_per_prompt = {batch})")
    if cfg.model.kind == "pretrained":
        for name in ("teacher_path", "student_path"):
            if not getattr(cfg.model, name):
                raise ConfigError(f"model.{name}", "required when model.kind=pretrained")
    else:  # the tiny pair is bootstrapped: a path given here would be silently ignored
        for name in ("teacher_path", "student_path", "tokenizer_path"):
            if getattr(cfg.model, name):
                raise ConfigError(f"model.{name}", f"got {getattr(cfg.model, name)!r}, only used when "
                                  f"model.kind=pretrained (model.kind is {cfg.model.kind!r})")
    if cfg.sampling.backend == "vllm" and cfg.model.lora_rank:
        raise ConfigError("model.lora_rank", f"got {cfg.model.lora_rank} with sampling.backend=vllm, allowed: 0 "
                          "(the engine is synced with the student's full weights; adapters are not merged)")
    server = cfg.model.teacher_server
    if server is not None and not server.startswith(("http://", "https://")):
        raise ConfigError("model.teacher_server", f"got {server!r}, allowed: null or an http(s):// URL of a vLLM "
                          "server (e.g. http://localhost:8000)")
    if server is not None and cfg.eval.teacher:
        raise ConfigError("eval.teacher", f"got true with model.teacher_server={server!r}, allowed: false (a served "
                          "teacher scores responses; it is not evaluated here)")
    for name in cfg.model.teachers or {}:  # a teacher per task (the mix): only tasks a run can train on
        if name not in ("math", "agentic"):
            raise ConfigError("model.teachers", f"unknown task {name!r}; allowed keys: math, agentic")
    if cfg.eval.n_prompts is not None and cfg.eval.n_prompts > cfg.task.n_eval:
        raise ConfigError("eval.n_prompts", f"got {cfg.eval.n_prompts}, allowed: <= task.n_eval "
                          f"({cfg.task.n_eval}), the prompts each eval split has")


def load_run_config(node: Any) -> RunConfig:
    """Validate a composed Hydra config (the ``hydra`` key excluded) into a :class:`RunConfig`."""
    cfg = validate(RunConfig, node)
    check_cross_fields(cfg)
    return cfg
