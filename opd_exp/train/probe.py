"""Gradient probe: every objective's gradient on the same rollout batch, against the exact reverse-KL gradient.

    rows = probe_step(pair, prompts, cfg, backend, special_ids)        # one checkpoint of a run: a list of dicts

The bias/variance trade-off of arXiv 2603.25562's theory, measured on the language model (the estimator
comparison, ``experiment=estimators``). At a checkpoint the probe samples one rollout batch from the current
student, scores it with everything any of the objectives needs (the union of their ``Needs``), splits its rows
into M micro-batches and, for each objective, takes the gradient of its loss wrt the student's parameters on
each micro-batch (:func:`flat_grad`). Every objective sees the same rollouts and the same student; the student is
pi_old, so PPO ratios are 1 and clipping is inactive. Per objective (pure functions of the flat gradients):

    cosine      cos(g_bar, g_bar_ref): the mean micro-batch gradient against the exact full-vocabulary
                reverse-KL gradient (``full_rkl``) averaged the same way (bias: 1 for an exact objective)
    cosine_mb   mean over micro-batches of cos(g_m, g_ref,m): what one micro-batch's update looks like
    variance    (1 / (M - 1)) sum_m ||g_m - g_bar||^2, the trace of a micro-batch gradient's covariance (the
                micro-batches hold different prompts: the reference's own variance is the floor from them)
    rel_variance  variance / ||g_bar||^2 (noise-to-signal; scale-free across objectives)
    time_s      wall time of one micro-batch's student forward + loss + backward
    peak_mb     peak memory above the baseline during it (CUDA: allocator peak; CPU: peak RSS, Linux only)

Measurement only: no parameter, optimizer state or ``.grad`` changes (``torch.autograd.grad``), and the caller
forks the RNG so the run's own trajectory is the same with and without the probe.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from opd_exp.config import EstimatorConfig, RunConfig
from opd_exp.config.validation import ConfigError, validate
from opd_exp.models.forward import response_head
from opd_exp.objectives import ESTIMATORS, Batch, EstimatorSpec, Needs, TeacherScores
from opd_exp.train.collect import collect

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
REFERENCE = "full_rkl"  # the exact per-token reverse KL over the full vocabulary
SKIPPED = ("seq_kd",)  # off-policy (teacher rollouts): not an estimator of the reverse-KL gradient


# ----------------------------------------------------------------------------- objectives


def estimator_preset(name: str) -> EstimatorConfig:
    """conf/estimator/<name>.yaml over the schema's defaults, validated (what ``estimator=<name>`` composes)."""
    path = CONF_DIR / "estimator" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "estimator").glob("*.yaml"))
        raise ConfigError("estimator.probe_objectives", f"got {name!r}, allowed values: {', '.join(known)}")
    return validate(EstimatorConfig, OmegaConf.to_container(OmegaConf.load(path)), prefix="estimator")


def probe_objectives(names: list[str] | None) -> dict[str, tuple[EstimatorSpec, EstimatorConfig]]:
    """The probed objectives by preset name (None: every preset but seq_kd), the reference first."""
    if names is None:
        names = sorted(p.stem for p in (CONF_DIR / "estimator").glob("*.yaml") if p.stem not in SKIPPED)
    ordered = [REFERENCE] + [n for n in names if n != REFERENCE]
    out = {}
    for name in ordered:
        cfg = estimator_preset(name)
        out[name] = (ESTIMATORS[cfg.name], cfg)
    return out


def union_needs(needs: list[Needs]) -> Needs:
    """Everything any of ``needs`` asks for (on-policy rollouts only)."""
    return Needs(teacher_sampled=any(n.teacher_sampled for n in needs),
                 teacher_topk=max(n.teacher_topk for n in needs), teacher_full=any(n.teacher_full for n in needs),
                 student_topk=max(n.student_topk for n in needs), rollout_policy="student")


def restrict(batch: Batch, needs: Needs) -> Batch:
    """``batch`` with exactly what ``needs`` asks for: the top-K cut to its K (both top-Ks are sorted), the rest
    None, so an objective reads what its own run would have collected."""
    t = batch.teacher
    cut = lambda x, k: x[..., :k] if k and x is not None else None  # noqa: E731
    teacher = TeacherScores(sampled_logprobs_BT=t.sampled_logprobs_BT if needs.teacher_sampled else None,
                            topk_ids_BTK=cut(t.topk_ids_BTK, needs.teacher_topk),
                            topk_logprobs_BTK=cut(t.topk_logprobs_BTK, needs.teacher_topk),
                            student_topk_ids_BTK=cut(t.student_topk_ids_BTK, needs.student_topk),
                            at_student_topk_logprobs_BTK=cut(t.at_student_topk_logprobs_BTK, needs.student_topk),
                            full=t.full if needs.teacher_full else None)
    return replace(batch, teacher=teacher)


# ----------------------------------------------------------------------------- measurement


def flat_grad(student, batch: Batch, spec: EstimatorSpec, cfg: EstimatorConfig, vocab_size: int,
              temperature: float) -> torch.Tensor:
    """d loss / d theta of one objective on ``batch``, flattened over the student's trainable parameters
    (float32, (P,), zeros for parameters the loss does not reach). The head is taken as in the update
    (response positions, the sampling temperature); nothing is accumulated into ``.grad``."""
    params = [p for p in student.parameters() if p.requires_grad]
    head = response_head(student, batch.prompt_ids_BP, batch.prompt_mask_BP, batch.ids_BT, batch.attention_mask_BT,
                         vocab_size, temperature)
    loss = spec.loss(head, batch, cfg).loss
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for p, g in zip(params, grads,
                                                                                                   strict=True)])


def cosine(a_P: torch.Tensor, b_P: torch.Tensor) -> float:
    """a.b / (|a| |b|) in float64; NaN when either vector is 0."""
    a, b = a_P.double(), b_P.double()
    norms = a.norm() * b.norm()
    return float(a @ b / norms) if norms > 0 else float("nan")


def micro_batch_variance(grads_MP: torch.Tensor) -> float:
    """Trace of the covariance of the M micro-batch gradients (rows of ``grads_MP``), unbiased:
    (1 / (M - 1)) sum_m ||g_m - g_bar||^2. Needs M >= 2."""
    g = grads_MP.double()
    if g.shape[0] < 2:
        raise ValueError(f"micro_batch_variance needs at least 2 micro-batches, got {g.shape[0]}")
    return float((g - g.mean(0)).square().sum() / (g.shape[0] - 1))


def proc_status_kb(key: str) -> int | None:
    """A /proc/self/status field in kB (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory above the level at ``start()`` (MB): CUDA allocator stats, or Linux's VmHWM reset through
    /proc/self/clear_refs (None where neither is available; on CPU allocations under glibc's mmap threshold
    are not returned to the OS, so small differences are noise)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:  # no gc.collect(): tensors are freed by refcount, and a collect costs ~0.5 s
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = (proc_status_kb("VmRSS") or 0) * 1024
        except OSError:
            self.base = None

    def peak_mb(self) -> float | None:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        hwm = proc_status_kb("VmHWM")
        return None if self.base is None or hwm is None else max(hwm * 1024 - self.base, 0) / 2**20


def measure(student, micro: list[Batch], objectives: dict[str, tuple[EstimatorSpec, EstimatorConfig]],
            vocab_size: int, temperature: float) -> list[dict]:
    """One row per objective (module docstring): its gradient on every micro-batch against the reference's.
    ``objectives`` must hold REFERENCE; each objective gets the micro-batches restricted to its Needs."""
    device = next(student.parameters()).device
    memory = PeakMemory(device)
    grads: dict[str, torch.Tensor] = {}
    rows = []
    for name, (spec, cfg) in objectives.items():
        needs = spec.needs(cfg)
        per_mb, times, peaks = [], [], []
        for mb in micro:
            memory.start()
            t0 = time.perf_counter()
            per_mb.append(flat_grad(student, restrict(mb, needs), spec, cfg, vocab_size, temperature))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peaks.append(memory.peak_mb())
        grads[name] = torch.stack(per_mb)
        rows.append({"objective": name, "time_s": sum(times) / len(times),
                     "peak_mb": None if None in peaks else max(peaks)})
    ref_MP = grads[REFERENCE]
    for row in rows:
        g_MP = grads[row["objective"]]
        mean_P = g_MP.mean(0)
        variance = micro_batch_variance(g_MP)
        sq_norm = float(mean_P.double().square().sum())
        row |= {"cosine": cosine(mean_P, ref_MP.mean(0)),
                "cosine_mb": sum(cosine(g, r) for g, r in zip(g_MP, ref_MP, strict=True)) / len(g_MP),
                "variance": variance, "rel_variance": variance / sq_norm if sq_norm > 0 else float("nan"),
                "grad_norm": sq_norm ** 0.5}
    return rows


def split_rows(n: int, parts: int) -> list[torch.Tensor]:
    """``parts`` contiguous, near-equal row index groups of ``range(n)`` (each non-empty: needs n >= parts)."""
    if n < parts:
        raise ValueError(f"cannot split {n} rollouts into {parts} micro-batches")
    return list(torch.arange(n).tensor_split(parts))


def probe_step(pair, prompts: list[list[int]], cfg: RunConfig, backend, special_ids: list[int]) -> list[dict]:
    """Sample and score one rollout batch for the union of the probed objectives' Needs, then :func:`measure`
    on ``cfg.estimator.probe_micro_batches`` micro-batches of its rows."""
    objectives = probe_objectives(cfg.estimator.probe_objectives)
    needs = union_needs([spec.needs(c) for spec, c in objectives.values()])
    batch, _ = collect(pair, prompts, cfg, needs, backend, special_ids)
    device = next(pair.student.parameters()).device
    micro = [batch.rows(rows, device) for rows in split_rows(len(batch), cfg.estimator.probe_micro_batches)]
    return measure(pair.student, micro, objectives, pair.vocab_size, cfg.sampling.temperature)


def append_rows(path: Path, step: int, rows: list[dict]) -> None:
    """One JSON line per objective, ``step`` first (the report reads ``probe.jsonl`` of each run dir)."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **row}) + "\n")
