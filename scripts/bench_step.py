"""Time of one OPD step per estimator, split into its phases, with tokens/s, peak memory and model-FLOPs
utilisation against a matmul peak measured in the same run.

Usage:
    python scripts/bench_step.py                          # default + large pair, the main estimators, 5 steps each
    python scripts/bench_step.py --pairs default --estimators topk_rkl,sampled_token --steps 3 --out /tmp/bench
    python scripts/bench_step.py --threads 1              # one torch thread (a sweep's cell under local_parallel)
    python scripts/bench_step.py --backends hf,decode     # the rollout backends side by side

Pairs:
    default  the embedded tiny pair of ``opd-exp`` (bootstrapped into OPD_EXP_CACHE on first use): trained
             models, so responses end where the trained student ends them (~28 tokens).
    large    random-init Llamas over the same tokenizer: teacher hidden 448 x 6 layers (~20M parameters),
             student 192 x 4 (the default teacher's shape). Random weights rarely write the end token, so its
             responses run to ``sampling.max_new_tokens``; compare its phases with each other, not with the
             default pair's.

Each step is ``opd_exp.train.step.train_step`` exactly as ``opd-exp`` runs it (16 prompts x 4 rollouts, two
PPO mini-batches of 32, top-p 0.9, 64 new tokens at most), diagnostics off. Phases are timed by wrapping the
step's own functions (nothing is re-implemented): ``rollout`` (the backend's generate), ``pi_old`` (the
student's scoring pass in collect), ``teacher`` (the teacher's scoring), ``student_fwd`` (the student's
forward with grad in each mini-batch), ``loss`` (the objective's forward), ``optimizer`` (AdamW's step),
``backward`` (the rest of the update: backward, gradient clipping, batch slicing) and ``other`` (the step
minus all of these: masks, metrics).

FLOPs: 2 N per token of a forward pass, 6 N for forward + backward, with N each model's matmul parameters
(every Linear, the output projection included; the embedding lookup is not a matmul). Tokens are the real
(unpadded) prompt + response tokens; generation counts one forward per generated token and per prompt token.
Attention's score FLOPs are left out (sequences of < 100 tokens: < 3% here). MFU = model FLOPs / step time /
the float32 matmul peak measured at start-up (1024 x 1024, same threads). Peak memory: the process's peak
resident set size during the step (VmHWM, reset before each step; Linux only).

Writes <out>/step.csv and <out>/step.md (command, machine, date) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from opd_exp.train.probe import proc_status_kb

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ESTIMATORS = ["sampled_token", "topk_rkl", "full_rkl", "seq_rkl", "jsd", "vopd"]
PHASES = ["rollout", "pi_old", "teacher", "student_fwd", "loss", "backward", "optimizer", "other"]


# --- machine -----------------------------------------------------------------------------------------------


def matmul_peak_gflops(n: int = 1024, seconds: float = 2.0) -> float:
    """Best float32 GFLOP/s of an n x n matmul over ``seconds`` (2 n^3 FLOPs a product)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# --- pairs -------------------------------------------------------------------------------------------------


def run_config(estimator: str, threads: int, overrides: tuple[str, ...] = ()):
    """The default ``opd-exp`` RunConfig with ``estimator`` and ``overrides`` (composed from conf/, as the CLI
    does)."""
    from hydra import compose, initialize_config_dir

    from opd_exp.config import load_run_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        node = compose("config", overrides=[f"estimator={estimator}", f"threads={threads}", "train.diag_every=0",
                                                 *overrides])
    return load_run_config(node)


def pair_note() -> str:
    """The default pair's cache entry and vocabulary size, for the tables' provenance line."""
    from opd_exp.models.bootstrap import entry_dir
    from opd_exp.models.tokenization import build_tokenizer

    cfg = run_config("topk_rkl", 0)
    return f"the embedded tiny pair {entry_dir(cfg.model, cfg.task).name} (V = {len(build_tokenizer())})"


def matmul_params(model) -> int:
    """Parameters of every Linear (output projection included, even when tied to the embedding)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def default_pair(cfg):
    from opd_exp.models.pair import load_pair

    return load_pair(cfg.model, cfg.task)


def large_pair(cfg):
    """Random-init Llama teacher (448 x 6, ~20M) and student (192 x 4) over the default pair's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd_exp.models.pair import ModelPair, load_pair

    tok = load_pair(cfg.model, cfg.task).tokenizer
    torch.manual_seed(0)

    def llama(hidden: int, layers: int):
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=hidden // 64 if hidden % 64 == 0 else 4, max_position_embeddings=512,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False))

    teacher, student = llama(448, 6), llama(192, 4)
    teacher.eval().requires_grad_(False)
    student.train()
    return ModelPair(teacher=teacher, student=student, tokenizer=tok, teacher_tokenizer=tok)


# --- timing ------------------------------------------------------------------------------------------------


class PhaseClock:
    """Accumulates wall time per phase name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return timed


@contextmanager
def instrumented(clock: PhaseClock, backend, optimizer):
    """Wraps the step's functions (collect's scorers, update's forward, the backend, the optimizer) with
    ``clock``; restores them on exit."""
    from opd_exp.train import collect, update
    from opd_exp.train import step as step_module

    saved = [(collect, "score_student_old"), (collect, "score_teacher"), (update, "response_head"),
             (step_module, "update")]
    originals = [getattr(mod, name) for mod, name in saved]
    names = {"score_student_old": "pi_old", "score_teacher": "teacher", "response_head": "student_fwd",
             "update": "update"}
    for (mod, name), fn in zip(saved, originals, strict=True):
        setattr(mod, name, clock.wrap(names[name], fn))
    backend.generate = clock.wrap("rollout", type(backend).generate.__get__(backend))
    optimizer.step = clock.wrap("optimizer", type(optimizer).step.__get__(optimizer))
    try:
        yield
    finally:
        for (mod, name), fn in zip(saved, originals, strict=True):
            setattr(mod, name, fn)
        del backend.generate, optimizer.step


class TokenCounter:
    """Real prompt and response tokens of each rollout (wraps the backend's generate)."""

    def __init__(self, backend):
        self.prompt = self.response = self.rows = 0
        inner = backend.generate

        def counted(*args, **kwargs):
            ro = inner(*args, **kwargs)
            self.prompt += int(ro.prompt_mask_BP.sum())
            self.response += int(ro.completion_mask_BT.sum())
            self.rows += len(ro)
            return ro
        backend.generate = counted


def step_flops(n_student: int, n_teacher: int, prompt_tokens: int, response_tokens: int, ppo_epochs: int,
               needs_teacher_forward: bool = True) -> float:
    """Model FLOPs of one step (see the module docstring): generation + pi_old + teacher forwards (2 N a token)
    and the student's forward + backward per PPO epoch (6 N a token)."""
    tokens = prompt_tokens + response_tokens
    return (2 * n_student * tokens  # rollout (prefill + one forward a generated token)
            + 2 * n_student * tokens  # pi_old
            + (2 * n_teacher * tokens if needs_teacher_forward else 0)
            + 6 * n_student * tokens * ppo_epochs)


def bench_cell(pair_name: str, estimator: str, steps: int, warmup: int, threads: int, peak_gflops: float,
               pairs_cache: dict, backend_name: str | None = None) -> dict:
    from opd_exp.objectives import ESTIMATORS, EstimatorSpec
    from opd_exp.rollout import make_backend
    from opd_exp.tasks.base import make_task
    from opd_exp.train.loop import make_scheduler, prompts_for_step, seed_everything
    from opd_exp.train.step import train_step

    cfg = run_config(estimator, threads, (f"sampling.backend={backend_name}",) if backend_name else ())
    if pair_name not in pairs_cache:
        pairs_cache[pair_name] = (default_pair if pair_name == "default" else large_pair)(cfg)
    pair = pairs_cache[pair_name]
    student_state = {k: v.clone() for k, v in pair.student.state_dict().items()}
    task = make_task(cfg.task)
    spec = ESTIMATORS[cfg.estimator.name]
    clock = PhaseClock()
    timed_spec = EstimatorSpec(loss=clock.wrap("loss", spec.loss), needs=spec.needs)
    backend = make_backend(cfg.sampling.backend)
    optimizer = torch.optim.AdamW(pair.student.parameters(), lr=cfg.train.lr)
    scheduler = make_scheduler(optimizer, cfg)
    seed_everything(0)
    rows = []
    for step in range(warmup + steps):
        idx = prompts_for_step(len(task.train), 0, step, cfg.train.prompts_per_step)
        prompts = [task.prompt_ids(pair.tokenizer, task.train[i]) for i in idx]
        clock.seconds = {}
        with instrumented(clock, backend, optimizer):
            counter = TokenCounter(backend)
            reset_peak_rss()
            rss_before = proc_status_kb("VmRSS")
            t0 = time.perf_counter()
            train_step(pair, prompts, cfg, timed_spec, backend, optimizer, scheduler, special_ids=[], diagnose=False)
            seconds = time.perf_counter() - t0
        if step < warmup:
            continue
        peak = proc_status_kb("VmHWM")
        phases = {p: clock.seconds.get(p, 0.0) for p in ("rollout", "pi_old", "teacher", "student_fwd", "loss",
                                                          "optimizer")}
        update_s = clock.seconds["update"]
        phases["backward"] = update_s - phases["student_fwd"] - phases["loss"] - phases["optimizer"]
        phases["other"] = seconds - update_s - phases["rollout"] - phases["pi_old"] - phases["teacher"]
        rows.append(dict(seconds=seconds, phases=phases, prompt=counter.prompt, response=counter.response,
                         peak_mb=(peak or 0) / 1024, rss_before_mb=(rss_before or 0) / 1024))
    pair.student.load_state_dict(student_state)  # every estimator starts from the same student
    needs = spec.needs(cfg.estimator)
    n_s, n_t = matmul_params(pair.student), matmul_params(pair.teacher)
    median_row = sorted(rows, key=lambda r: r["seconds"])[len(rows) // 2]
    med = median_row["seconds"]
    prompt_toks = statistics.mean(r["prompt"] for r in rows)
    resp_toks = statistics.mean(r["response"] for r in rows)
    flops = step_flops(n_s, n_t, prompt_toks, resp_toks, cfg.train.ppo_epochs,
                       needs_teacher_forward=needs.rollout_policy == "student")
    out = {"pair": pair_name, "estimator": estimator, "backend": cfg.sampling.backend, "step_s": med,
           "min_step_s": min(r["seconds"] for r in rows), "steps": len(rows)}
    for p in PHASES:  # the median step's phases (they add up to its time)
        out[f"{p}_s"] = median_row["phases"][p]
    out |= {"response_tokens": resp_toks, "tokens_per_s": (prompt_toks + resp_toks) / med,
            "response_tokens_per_s": resp_toks / med, "gflop_per_step": flops / 1e9,
            "mfu_pct": 100 * flops / med / (peak_gflops * 1e9),
            "peak_rss_mb": max(r["peak_mb"] for r in rows),
            "step_rss_growth_mb": max(r["peak_mb"] - r["rss_before_mb"] for r in rows),
            "student_params_m": n_s / 1e6, "teacher_params_m": n_t / 1e6}
    return out


# --- output ------------------------------------------------------------------------------------------------


def write(rows: list[dict], out: Path, peak_gflops: float, argv: list[str], threads: int) -> None:
    from opd_exp.rundir import git_commit

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "step.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["pair", "estimator", "backend", "step_s"] + [f"{p}_s" for p in PHASES] + [
        "response_tokens", "tokens_per_s", "gflop_per_step", "mfu_pct", "peak_rss_mb"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        "# One OPD step: time per phase, throughput, MFU, peak memory",
        "",
        f"Command: `python {' '.join(argv)}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {threads or torch.get_num_threads()}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  ",
        f"Code: commit {git_commit()}; default pair: {pair_note()}  ",
        f"Matmul peak measured in this run (float32, 1024^2): **{peak_gflops:.1f} GFLOP/s**",
        "",
        "Seconds: the median timed step (after warm-up) and its phases; phases are defined in "
        "`scripts/bench_step.py`'s docstring; `tokens_per_s` counts real prompt + response tokens of the batch.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    (out / "step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="default,large")
    ap.add_argument("--estimators", default=",".join(DEFAULT_ESTIMATORS))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per cell")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--backends", default="", help="rollout backends to compare, e.g. hf,decode (default: the "
                    "config's sampling.backend): one cell per estimator and backend, in the order given")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()
    print(f"[bench_step] float32 matmul peak: {peak:.1f} GFLOP/s", file=sys.stderr)
    rows, cache = [], {}
    for pair_name in args.pairs.split(","):
        for est in args.estimators.split(","):
            for backend in args.backends.split(",") if args.backends else [None]:
                t0 = time.time()
                rows.append(bench_cell(pair_name, est, args.steps, args.warmup, args.threads, peak, cache, backend))
                print(f"[bench_step] {pair_name} {est} {rows[-1]['backend']}: {rows[-1]['step_s']:.3f} s/step "
                      f"({time.time() - t0:.0f} s)", file=sys.stderr)
            write(rows, args.out, peak, ["scripts/bench_step.py"] + (argv or sys.argv[1:]), args.threads)


if __name__ == "__main__":
    main()
