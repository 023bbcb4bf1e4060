"""opd-exp's OPD step against TRL's DistillationTrainer (and GKDTrainer with lmbda = 1), like for like, in one
process, alternated step by step.

Usage:
    pip install -e ".[bench]"                   # TRL 1.16 (bench-only; never a runtime dependency)
    python scripts/bench_vs_trl.py              # 7 rounds, the default pair; ~5 min on 2 cores
    python scripts/bench_vs_trl.py --rounds 3 --out /tmp/bench --no-gkd

What is compared. The same models (the embedded default pair, each side starting from the same student
weights), the same 16 prompts x 4 rollouts (TRL: each prompt repeated 4 times, one completion per row), up to
64 new tokens, temperature 1, top-p 0.9, the same learning rate, and the same divergence: the full-vocabulary
reverse KL (opd-exp ``estimator=full_rkl``; TRL ``beta=1``, its generalised JSD's reverse-KL end). One unit of
work is 64 rollouts and two optimizer updates of 32 (the paper's batch / mini-batch ratio): one opd-exp step
(``train.mini_batch_size=32``), two TRL steps of 32 rows. opd-exp's ``topk_rkl`` and ``sampled_token`` (which
TRL does not have) run in the same rounds, for the within-suite ratio the issue asks for.

How. TRL's trainer runs ``2 x rounds`` steps; a callback at the end of every second TRL step runs one step of
each opd-exp objective (timed on its own). TRL's time for a unit is the wall time between the callbacks minus
the time spent inside them, so both sides see the same machine state, round by round. GKD (``lmbda=1``:
always on-policy, ``beta=1``) runs after, with the same alternation; its generation is hard-wired to top-p 1,
so its opd-exp partner runs ``sampling=full`` too. Each round's ratio is reported, and the median.

Writes <out>/vs_trl.csv and <out>/vs_trl.md (command, machine, date, versions).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from bench_step import PhaseClock, instrumented, pair_note, run_config  # noqa: E402

OPD_ESTIMATORS = ["full_rkl", "topk_rkl", "sampled_token"]


class OpdSide:
    """One opd-exp objective's student, optimizer and step, on its own copy of the initial student."""

    def __init__(self, pair, initial_student, estimator: str, threads: int, overrides: tuple[str, ...] = ()):
        from opd_exp.objectives import ESTIMATORS, EstimatorSpec
        from opd_exp.rollout import make_backend
        from opd_exp.train.loop import make_scheduler

        self.cfg = run_config(estimator, threads, overrides + ("train.mini_batch_size=32",))
        self.pair = copy.copy(pair)
        self.pair.student = copy.deepcopy(initial_student).train()
        self.clock = PhaseClock()
        spec = ESTIMATORS[self.cfg.estimator.name]
        self.spec = EstimatorSpec(loss=self.clock.wrap("loss", spec.loss), needs=spec.needs)
        self.backend = make_backend(self.cfg.sampling.backend)
        self.optimizer = torch.optim.AdamW(self.pair.student.parameters(), lr=self.cfg.train.lr)
        self.scheduler = make_scheduler(self.optimizer, self.cfg)
        self.seconds: list[float] = []
        self.phases: list[dict[str, float]] = []

    def step(self, prompts: list[list[int]]) -> None:
        from opd_exp.train.step import train_step

        self.clock.seconds = {}
        with instrumented(self.clock, self.backend, self.optimizer):
            t0 = time.perf_counter()
            train_step(self.pair, prompts, self.cfg, self.spec, self.backend, self.optimizer, self.scheduler,
                       special_ids=[], diagnose=False)
            self.seconds.append(time.perf_counter() - t0)
        self.phases.append(dict(self.clock.seconds))


def alternate(trainer, sides: list[OpdSide], prompts_of_round, rounds: int) -> list[float]:
    """Runs ``trainer`` for 2 x rounds steps; after every second step, one step of each side. Returns TRL's
    seconds per unit (two steps), the time inside the callback excluded."""
    from transformers import TrainerCallback

    trl_units: list[float] = []

    class Alternate(TrainerCallback):
        def __init__(self):
            self.mark = None

        def on_train_begin(self, args, state, control, **kw):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % 2:
                return
            trl_units.append(time.perf_counter() - self.mark)
            for side in sides:
                side.step(prompts_of_round(state.global_step // 2 - 1))
            self.mark = time.perf_counter()

    trainer.add_callback(Alternate())
    trainer.train()
    return trl_units


def distillation_trainer(pair, initial_student, rows: list[str], rounds: int, out_dir: str, gkd: bool):
    """TRL's DistillationTrainer (or GKDTrainer, lmbda 1) over ``rows`` (templated prompt texts)."""
    from datasets import Dataset

    student = copy.deepcopy(initial_student).train()
    common = dict(output_dir=out_dir, per_device_train_batch_size=32, gradient_accumulation_steps=1,
                  learning_rate=5e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                  max_steps=2 * rounds, logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True,
                  bf16=False, gradient_checkpointing=False, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if gkd:
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(**common, lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=64, seq_kd=False)
            data = Dataset.from_list([{"messages": [{"role": "user", "content": r},
                                                    {"role": "assistant", "content": ""}]} for r in rows])
            return GKDTrainer(model=student, teacher_model=pair.teacher, args=args, train_dataset=data,
                              processing_class=pair.tokenizer)
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**common, beta=1.0, temperature=1.0, top_p=0.9, max_completion_length=64,
                                  shuffle_dataset=False)
        data = Dataset.from_list([{"prompt": r} for r in rows])
        return DistillationTrainer(model=student, teacher_model=pair.teacher, args=args, train_dataset=data,
                                   processing_class=pair.tokenizer)


def summarise(name: str, trl_units: list[float], sides: list[OpdSide]) -> list[dict]:
    rows = []
    trl_med = statistics.median(trl_units)
    for side in sides:
        ratios = [t / o for t, o in zip(trl_units, side.seconds, strict=True)]
        phase_med = {p: statistics.median(ph.get(p, 0.0) for ph in side.phases)
                     for p in ("rollout", "pi_old", "teacher", "student_fwd", "loss", "optimizer")}
        rows.append({"trl_trainer": name, "opd_estimator": side.cfg.estimator.name,
                     "top_p": side.cfg.sampling.top_p, "rounds": len(trl_units),
                     "trl_s_per_unit": trl_med, "opd_s_per_unit": statistics.median(side.seconds),
                     "speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                     "speedup_max": max(ratios)} | {f"opd_{p}_s": v for p, v in phase_med.items()})
    return rows


def write(rows: list[dict], out: Path, argv: list[str]) -> None:
    import transformers
    import trl

    from opd_exp.rundir import git_commit

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "vs_trl.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["trl_trainer", "opd_estimator", "top_p", "rounds", "trl_s_per_unit", "opd_s_per_unit",
            "speedup_median", "speedup_min", "speedup_max", "opd_rollout_s", "opd_teacher_s"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["# opd-exp vs TRL: seconds per unit of work (64 rollouts + 2 updates of 32), alternated in one run",
             "", f"Command: `python {' '.join(argv)}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, trl {trl.__version__}, threads {torch.get_num_threads()}; "
             f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  ",
             f"Code: commit {git_commit()}; pair: {pair_note()}  ",
             "speedup = TRL's seconds / opd-exp's seconds for the same round (median, min, max over rounds); "
             "see the script's docstring for what is alike on both sides.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    (out / "vs_trl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-gkd", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # the phase clock wraps optimizer.step after the scheduler exists (timing only)
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    if args.threads:
        torch.set_num_threads(args.threads)
    from opd_exp.models.pair import load_pair
    from opd_exp.tasks.base import make_task
    from opd_exp.train.loop import prompts_for_step, seed_everything

    cfg = run_config("full_rkl", args.threads)
    pair, task = load_pair(cfg.model, cfg.task), make_task(cfg.task)
    initial = copy.deepcopy(pair.student)

    def prompts_of_round(r: int) -> list[list[int]]:
        idx = prompts_for_step(len(task.train), 0, r, 16)
        return [task.prompt_ids(pair.tokenizer, task.train[i]) for i in idx]

    # TRL reads prompt texts: the same templated prompts, each repeated 4 times (4 rollouts), in round order
    texts = []
    for r in range(args.rounds):
        for ids in prompts_of_round(r):
            text = pair.tokenizer.decode(ids)
            if pair.tokenizer(text=text)["input_ids"] != ids:
                raise SystemExit(f"TRL would tokenize {text!r} differently from opd-exp")
            texts += [text] * 4
    rows, cmd = [], ["scripts/bench_vs_trl.py"] + (argv if argv is not None else sys.argv[1:])
    seed_everything(0)
    with tempfile.TemporaryDirectory() as tmp:
        sides = [OpdSide(pair, initial, e, args.threads) for e in OPD_ESTIMATORS]
        trainer = distillation_trainer(pair, initial, texts, args.rounds, tmp, gkd=False)
        rows += summarise("DistillationTrainer", alternate(trainer, sides, prompts_of_round, args.rounds), sides)
        write(rows, args.out, cmd)
        if not args.no_gkd:
            sides = [OpdSide(pair, initial, "full_rkl", args.threads, ("sampling=full",))]
            trainer = distillation_trainer(pair, initial, texts, args.rounds, tmp, gkd=True)
            rows += summarise("GKDTrainer(lmbda=1)", alternate(trainer, sides, prompts_of_round, args.rounds),
                              sides)
            write(rows, args.out, cmd)


if __name__ == "__main__":
    main()
