"""The run: setup, the loop over steps, evaluation before and after, checkpoints and bookkeeping.

    for step in range(steps):
        prompts  = step's prompts (a seeded permutation of the task's pool, epoch by epoch)
        metrics  = train_step(...)          # opd_exp/train/step.py: collect a Batch, update on it
        log train/ and diag/ metrics; evaluate every eval_every steps; checkpoint every checkpoint_every

A run resumes bit-exactly from its last checkpoint; SIGTERM checkpoints and exits with status "interrupted";
non-finite losses or gradients skip the update. Under torchrun the loop runs data-parallel: prompts sharded
across ranks, gradients averaged, rank 0 writing (opd_exp/train/distributed.py); with ``train.parallel=fsdp``
the student's weights, gradients and AdamW state are sharded too (opd_exp/train/fsdp.py), and every
evaluation runs on its gathered weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from opd_exp import rundir
from opd_exp.config import RunConfig
from opd_exp.config.validation import ConfigError
from opd_exp.models.audit import audit_tokenizers, check_pair_compatible, pair_probes
from opd_exp.models.pair import ModelPair, cache_root, load_pair, masked_token_ids, pair_identity, pair_paths
from opd_exp.models.teacher_server import unservable
from opd_exp.objectives import ESTIMATORS
from opd_exp.rollout import make_backend
from opd_exp.tasks.base import Task, episode_makers, make_task, step_task
from opd_exp.train import checkpoint, distributed, fsdp, probe
from opd_exp.train.diagnostics import save_raw_samples
from opd_exp.train.evaluate import EVAL_BACKEND, EVAL_VERSION, evaluate_model
from opd_exp.train.step import train_step
from opd_exp.train.tracking import Tracker

# ----------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fork_rng(device: torch.device):
    """A scope whose random draws leave the caller's generators as they were: the CPU's and, on CUDA, every
    device's (``fork_rng(devices=[])`` alone restores only the CPU generator)."""
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_against_vocab(cfg: RunConfig, vocab_size: int) -> None:
    """Cross-field checks that need the loaded pair."""
    if cfg.estimator.name == "topk_rkl" and cfg.estimator.top_k > vocab_size:
        raise ConfigError("estimator.top_k", f"got {cfg.estimator.top_k}, allowed: 1..{vocab_size} (vocab size)")


def check_against_world(cfg: RunConfig, world: int) -> None:
    """Data-parallel runs split each step's prompts and each mini-batch evenly across the ranks; a sharded
    student needs several ranks, and every rank in each of its forwards (the gradient probe runs on rank 0)."""
    if cfg.train.parallel == "fsdp" and world == 1:
        raise ConfigError("train.parallel", "got 'fsdp' on one process, allowed: 'ddp' (or launch the run with "
                                            "torchrun --nproc_per_node >= 2)")
    if cfg.train.parallel == "fsdp" and cfg.estimator.probe_every:
        raise ConfigError("estimator.probe_every", f"got {cfg.estimator.probe_every} with train.parallel=fsdp, "
                                                   "allowed: 0 (the probe runs on rank 0 alone)")
    for field, n in (("train.prompts_per_step", cfg.train.prompts_per_step),
                     ("train.mini_batch_size", cfg.train.mini_batch_size)):
        if n % world:
            raise ConfigError(field, f"got {n}, allowed: a multiple of the {world} data-parallel processes "
                                     "(torchrun --nproc_per_node)")


def check_served_teacher(cfg: RunConfig) -> None:
    """A served teacher (``model.teacher_server``) gives the sampled tokens' log-probs and its own top-K only."""
    url = cfg.model.teacher_server
    if url is None:
        return
    why = unservable(ESTIMATORS[cfg.estimator.name].needs(cfg.estimator))
    if why is not None:
        raise ConfigError("model.teacher_server", f"got {url!r} with estimator.name={cfg.estimator.name!r}, which "
                          f"{why}; allowed: null (the teacher scored here), or an objective reading only the "
                          "teacher's sampled-token log-probs or its top-K (e.g. sampled_token, topk_rkl)")
    if cfg.estimator.probe_every:
        raise ConfigError("estimator.probe_every", f"got {cfg.estimator.probe_every} with model.teacher_server, "
                          "allowed: 0 (the probe scores every objective, full-vocabulary ones included)")


def prompts_for_step(n_pool: int, seed: int, step: int, n: int) -> list[int]:
    """Indices of step ``step``'s prompts: epochs over a seeded permutation of the pool (pure function, so the
    data position needs no state beyond the step)."""
    out, perms = [], {}
    for pos in range(step * n, (step + 1) * n):
        epoch, offset = divmod(pos, n_pool)
        if epoch not in perms:  # one permutation per epoch the step touches (usually one)
            perms[epoch] = torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(perms[epoch][offset]))
    return out


def make_scheduler(optimizer, cfg: RunConfig):
    def factor(step: int) -> float:
        if step < cfg.train.warmup_steps:
            return (step + 1) / cfg.train.warmup_steps
        if cfg.train.lr_schedule == "cosine":
            progress = (step - cfg.train.warmup_steps) / max(1, cfg.train.steps - cfg.train.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- the run


class _NoTracker:
    """A data-parallel rank > 0 logs nothing: rank 0 logs the step's metrics averaged over the ranks."""

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


class _StopFlag:
    """Set by SIGTERM (a scheduler's pre-emption notice); the loop checkpoints and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some launchers): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _before_cache_file(cfg: RunConfig) -> Path:
    """Where the pair's before-training evaluation is cached: keyed by the two checkpoints (path and the
    newest file time in each), the task, the eval settings, the sampling backend and ``EVAL_VERSION``, so every
    run of a sweep on one pair shares it and none reads what older code recorded."""
    teacher_dir, student_dir, _ = pair_paths(cfg.model, cfg.task)
    stamp = {str(d.resolve()): max((f.stat().st_mtime_ns for f in d.rglob("*") if f.is_file()), default=0)
             for d in (teacher_dir, student_dir)}
    blob = json.dumps({"pair": stamp, "task": dataclasses.asdict(cfg.task), "eval": dataclasses.asdict(cfg.eval),
                       "backend": EVAL_BACKEND, "version": EVAL_VERSION}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return cache_root(cfg.model) / "evals" / f"before-{key}.json"


def evaluate_pair_before(pair: ModelPair, task: Task, cfg: RunConfig) -> dict[str, float]:
    """Teacher and student-before results, with a fixed eval seed so every run of a sweep sees the same;
    computed once per (pair, task, eval settings) and cached beside the pair."""
    cache = _before_cache_file(cfg)
    if cache.is_file():
        try:
            return rundir.read_json(cache)
        except (OSError, json.JSONDecodeError):
            pass  # unreadable: recompute and rewrite it
    results = {}
    with fork_rng(next(pair.student.parameters()).device):
        torch.manual_seed(cfg.task.data_seed)
        if cfg.eval.teacher:
            results |= {f"teacher/{k}": v for k, v in
                        evaluate_model(pair.teacher, pair.tokenizer, task, cfg.eval, task.eval_splits,
                                       split_models=task_teachers(pair, task)).items()}
        results |= {f"student_before/{k}": v for k, v in
                    evaluate_model(pair.student, pair.tokenizer, task, cfg.eval, task.eval_splits).items()}
    rundir.atomic_write_json(cache, results)
    return results


def task_teachers(pair: ModelPair, task: Task) -> dict:
    """Eval split -> the teacher of its task, for a mix's splits (``<task>/<split>``) whose task has its own."""
    return {s: pair.teachers[s.split("/")[0]] for s in task.eval_splits if s.split("/")[0] in pair.teachers}


def check_pair_tokenizers(pair: ModelPair, task: Task) -> None:
    """Audit the teacher's tokenizer against the student's before training (failure mode 3, opd_exp.models.audit).

    An identical pair passes silently; a shared vocabulary with other mismatches (EOS, special tokens, template,
    how the task's markers split) logs the audit's report and trains on; different vocabularies stop the run,
    since no vocabulary mapping is implemented and the teacher would score the student's ids as its own."""
    if pair.teacher_tokenizer is pair.tokenizer:
        return
    report = audit_tokenizers(pair.teacher_tokenizer, pair.tokenizer, probes=pair_probes(pair, task))
    try:
        check_pair_compatible(report, mapping=None)
    except ValueError as err:
        raise ConfigError("model.teacher_path", str(err)) from None


def run(cfg: RunConfig, run_dir: Path) -> dict:
    """Train and evaluate one run in ``run_dir``; resume from its checkpoint when there is one.

    Returns {"status", "results"}: "completed"; "diverged" after ``train.max_nonfinite`` steps in a row with a
    skipped (non-finite) update; "interrupted" after SIGTERM, once the current step is done and checkpointed.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    distributed.init()
    check_against_world(cfg, distributed.world_size())
    check_served_teacher(cfg)
    seed_everything(cfg.seed + 100003 * distributed.rank())  # each rank samples its own rollouts
    device = distributed.local_device(pick_device(cfg.device))
    with _StopFlag() as stop:  # from the start: a SIGTERM while loading is honoured after the first step
        task = make_task(cfg.task)
        pair = load_pair(cfg.model, cfg.task, device)
        check_against_vocab(cfg, len(pair.tokenizer))
        check_pair_tokenizers(pair, task)
        # resolved whether or not masking is on: the diagnostics report the special tokens' share either way
        special_ids = masked_token_ids(pair, cfg.mask.tokens, cfg.model.special_tokens, cfg.mask.enabled)
        spec = ESTIMATORS[cfg.estimator.name]
        backend = make_backend(cfg.sampling.backend)
        student = pair.student
        student.train()
        if cfg.train.parallel == "fsdp":  # before the optimizer: it holds the sharded parameters
            fsdp.shard_model(student, device.type)
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = make_scheduler(optimizer, cfg)

        ckpt = checkpoint.load(run_dir)
        if ckpt is not None:
            checkpoint.restore(ckpt, model=student, optimizer=optimizer, scheduler=scheduler)
            start, state = ckpt["step"], ckpt["loop_state"]  # the evaluation before training is not redone
            rng_ranks = state.get("rng_ranks") or []  # data-parallel: each rank's own sampling RNG
            if distributed.world_size() > 1 and len(rng_ranks) == distributed.world_size():
                checkpoint.set_rng_state(rng_ranks[distributed.rank()])
            print(f"[opd-exp] resuming {run_dir} at step {start}/{cfg.train.steps}")
        else:
            with fsdp.gathered(student):  # a sharded student is evaluated on its full weights
                before = evaluate_pair_before(pair, task, cfg) if distributed.is_main() else {}
            start, state = 0, {"before": before, "nonfinite_total": 0, "nonfinite_streak": 0}
        # data-parallel: rank 0 alone writes the run dir and evaluates (opd_exp.train.distributed)
        tracker = Tracker(run_dir, cfg, resume_step=start) if distributed.is_main() else _NoTracker()

        def save(step: int) -> None:
            if distributed.world_size() > 1:  # every rank's sampling RNG, for a bit-exact resume
                state["rng_ranks"] = distributed.gather(checkpoint.rng_state())
            model_state, optimizer_state = checkpoint.train_states(student, optimizer)  # sharded: a collective
            if distributed.is_main():
                checkpoint.save(run_dir, step=step, model_state=model_state, optimizer_state=optimizer_state,
                                scheduler=scheduler, loop_state=state)

        status = "completed"
        bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="opd", leave=False,
                   disable=not distributed.is_main())
        for step in bar:
            t0 = time.time()
            sub, k = step_task(task, step)  # a mix's task of this step, and its batch count (else task, step)
            idx = distributed.shard(prompts_for_step(len(sub.train), cfg.seed, k, cfg.train.prompts_per_step))
            examples = [sub.train[i] for i in idx]
            prompts = [sub.prompt_ids(pair.tokenizer, ex) for ex in examples]
            last = step == cfg.train.steps - 1
            if cfg.estimator.probe_every and step % cfg.estimator.probe_every == 0 and distributed.is_main():
                with fork_rng(device):  # the probe's rollouts leave the run's own RNG (and trajectory) as it was
                    torch.manual_seed(cfg.seed * 1_000_003 + step)
                    probe.append_rows(run_dir / "probe.jsonl", step,
                                      probe.probe_step(pair, prompts, cfg, backend, special_ids))
            diagnose = bool(cfg.train.diag_every) and (step % cfg.train.diag_every == 0 or last)
            metrics, _, diag = train_step(pair.for_task(sub.name), prompts, cfg, spec, backend, optimizer,
                                          scheduler, special_ids, diagnose, episodes=episode_makers(sub, examples))
            # data-parallel: train/ averaged over the ranks; diag/ describes rank 0's share of the batch
            metrics = distributed.all_reduce_mean(metrics, summed=("train/masked_tokens",), from_main=("diag/",))
            if diag is not None and (step == 0 or last) and distributed.is_main():  # rank 0's share of the batch
                save_raw_samples(run_dir / "diag" / f"samples_step{step}.npz", diag, seed=cfg.seed)
            n_skipped = int(metrics.get("train/nonfinite/updates", 0))
            state["nonfinite_streak"] = state["nonfinite_streak"] + 1 if n_skipped else 0
            state["nonfinite_total"] += n_skipped
            metrics["train/nonfinite_skips"] = float(state["nonfinite_total"])
            if n_skipped:
                _warn_nonfinite(step, metrics, state["nonfinite_streak"], cfg.train.max_nonfinite)
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
                with fsdp.gathered(student):
                    if distributed.is_main():
                        metrics |= _periodic_eval(pair, task, cfg)
            if (step + 1) % cfg.train.log_every == 0 or n_skipped or diag is not None:  # diag rows never dropped
                tracker.log(step, metrics, time_s=time.time() - t0)
            bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.3f}",
                            len=f"{metrics['train/response_len']:.1f}")
            if state["nonfinite_streak"] >= cfg.train.max_nonfinite:
                status = "diverged"
                print(f"[opd-exp] {state['nonfinite_streak']} steps in a row with non-finite updates at step "
                      f"{step} (train.max_nonfinite={cfg.train.max_nonfinite}): stopping as diverged",
                      file=sys.stderr)
                break
            done = step + 1
            stopping = distributed.any_rank(stop.requested)  # every rank stops after the same step
            if stopping or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0):
                save(done)
            if stopping:  # SIGTERM: the step is done and saved; the entrypoint exits 143
                tracker.finish()
                return {"status": "interrupted", "results": {}, "interrupted_at_step": done}
        save(cfg.train.steps if status == "completed" else step)
        distributed.check_in_sync(student)
        with fsdp.gathered(student):
            if not distributed.is_main():
                return {"status": status, "results": {}}
            with fork_rng(device):
                torch.manual_seed(cfg.task.data_seed + 1)
                after = evaluate_model(student, pair.tokenizer, task, cfg.eval, task.eval_splits)
    results = dict(state["before"]) | {f"student_after/{k}": v for k, v in after.items()}
    results["train/nonfinite_skips"] = state["nonfinite_total"]
    tracker.log(cfg.train.steps, {f"eval/student_after/{k}": v for k, v in after.items() if "_ci" not in k})
    tracker.finish()
    evaluated = {split: len(examples[: cfg.eval.n_prompts] if cfg.eval.n_prompts else examples)
                 for split, examples in task.eval_splits.items()}
    return {"status": status, "results": results, "pair": pair_identity(cfg.model, cfg.task),
            "eval_prompts": evaluated}


def _warn_nonfinite(step: int, metrics: dict[str, float], streak: int, limit: int) -> None:
    """One stderr line per step with skipped updates (the full batch summary is in metrics.jsonl)."""
    bad = {k.removeprefix("train/nonfinite/"): v for k, v in metrics.items() if k.startswith("train/nonfinite/")}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in bad.items() if k in ("loss", "grad_norm", "reward", "len_mean"))
    print(f"[opd-exp] step {step}: skipped {int(bad['updates'])} non-finite update(s) ({shown}); "
          f"{streak} step(s) in a row, diverged at train.max_nonfinite={limit}", file=sys.stderr)


def _periodic_eval(pair: ModelPair, task: Task, cfg: RunConfig) -> dict[str, float]:
    """Greedy accuracy per split during training (independent of the training RNG stream)."""
    with fork_rng(next(pair.student.parameters()).device):
        res = evaluate_model(pair.student, pair.tokenizer, task, cfg.eval, task.eval_splits, sampled=False)
    return {f"eval/student/{k}": v for k, v in res.items() if not k.endswith("_ci")}
