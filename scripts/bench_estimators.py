"""Peak extra memory and time of each estimator's loss (forward + backward) at B*T = 4096 positions.

Usage:
    python scripts/bench_estimators.py --threads 1          # CPU, V in {1k, 32k, 152k}, ~4 min (shared 2 cores)
    python scripts/bench_estimators.py --vocab 1024 --threads 1 --out /tmp/bench   # quick check
    python scripts/bench_estimators.py --head projected --hidden 256 --vocab 32768 --out /tmp/bench
    python scripts/bench_estimators.py --device cuda        # torch.cuda.max_memory_allocated

Writes <out>/estimators.csv and <out>/estimators.md (command, machine, date) and prints the table.

What is measured, per (estimator, V): the student head with grad (``--head dense``: logits (B, T, V) float32;
``--head projected``: hidden states (B, T, H) and an output projection (V, H), float32, the logits never
materialised) and the teacher tensors that the estimator's ``Needs`` ask for (the teacher's head of the same
kind for full-vocabulary estimators) are allocated first (``teacher_MB``: their size); then the peak memory
above that baseline while computing the loss and its gradient wrt the student head's tensors
(``peak_extra_MB``). That peak includes the gradient every loss returns (``grad_MB``: (B, T, V) for a dense
head; (B, T, H) + (V, H) for a projected one); ``workspace_MB`` = peak_extra - grad is what the loss itself
keeps alive. CPU memory: Linux's peak resident set size (VmHWM), reset by writing
5 to /proc/self/clear_refs before each call, minus VmRSS just before it; tensors above glibc's mmap threshold
(fixed here at 64 KiB: the script re-executes itself with MALLOC_MMAP_THRESHOLD_=65536) are mmapped and
unmapped on free, so RSS follows every tensor above 64 KiB exactly; smaller ones are noise (< 1 MB).
Time: wall clock of one forward + backward after a warm-up call at V = 1024 (one run per cell: the machine
is shared; treat differences < 20% as noise).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import platform
import sys
import time
from pathlib import Path

import torch

from opd_exp.config import EstimatorConfig
from opd_exp.objectives import ESTIMATORS, Batch, LogitsHead, Needs, TeacherScores

CONFIGS = {  # bench name -> EstimatorConfig fields
    "sampled_token": dict(name="sampled_token"),
    "seq_rkl": dict(name="seq_rkl"),
    "full_rkl": dict(name="full_rkl"),
    "forward_kl": dict(name="forward_kl"),
    "jsd": dict(name="jsd", beta=0.5),
    "topk_rkl_v1": dict(name="topk_rkl", top_k=32),
    "topk_rkl_v3": dict(name="topk_rkl", top_k=32, add_sampled=True),
    "topk_rkl_v5": dict(name="topk_rkl", top_k=32, normalize="none", tail="sampled_is"),
    "topk_rkl_v5_official": dict(name="topk_rkl", top_k=32, normalize="none", tail="sampled_is_official"),
    "seq_kd": dict(name="seq_kd"),
    "topk_mopd": dict(name="topk_rkl", top_k=32, normalize="unnormalized_gkl"),
    "topk_sg": dict(name="topk_rkl", top_k=32, support="student", normalize="none", topk_stop_grad=True),
    "vopd": dict(name="vopd", vopd_value="full"),
    "vopd_topk": dict(name="vopd", vopd_value="student_topk", top_k=32),
    "power_opd": dict(name="power_opd", power_alpha=5.0),
    "iw_opd": dict(name="sampled_token", iw_opd_weight_max=1.5),
}
# seq_rkl, topk_rkl_v3, v5_official and seq_kd run the same kernels as sampled_token / topk_rkl_v1 / v5
# (--estimators adds them); topk_mopd / topk_sg are topk_rkl's kernels with full-vocabulary log-probs, vopd the
# sampled-token loss plus a full (or top-K) KL, power_opd / iw_opd the sampled-token loss with another advantage
DEFAULT = ["sampled_token", "full_rkl", "forward_kl", "jsd", "topk_rkl_v1", "topk_rkl_v5", "topk_mopd", "topk_sg",
           "vopd", "vopd_topk", "power_opd", "iw_opd"]
# at V > LARGE_V only these run by default (the 2-core machine is shared; forward_kl and jsd scale like full_rkl)
LARGE_DEFAULT = ["sampled_token", "full_rkl", "topk_rkl_v1"]
LARGE_V = 65536
MB = 2**20
MMAP_THRESHOLD = 65536


# --- memory probes ------------------------------------------------------------------------------------


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


class MemoryProbe:
    """baseline() before the call, peak_extra_bytes() after it (CPU: VmHWM - VmRSS; CUDA: allocator stats)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def baseline(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_kb("VmRSS") * 1024

    def peak_extra_bytes(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kb("VmHWM") * 1024 - self.base


# --- inputs -------------------------------------------------------------------------------------------


def make_head(kind: str, B: int, T: int, V: int, H: int, device, gen: torch.Generator, grad: bool):
    """A head of ``kind`` dense | projected with random float32 values, and its tensors (leaves)."""
    if kind == "dense":
        leaves = [torch.randn(B, T, V, generator=gen).mul_(2.0).to(device)]
    else:
        leaves = [torch.randn(B, T, H, generator=gen).to(device),
                  torch.randn(V, H, generator=gen).mul_(2.0 / H**0.5).to(device)]
    leaves = [x.requires_grad_(grad) for x in leaves]
    return LogitsHead(*leaves), leaves


def make_inputs(needs: Needs, B: int, T: int, V: int, args, device, gen: torch.Generator):
    """The student head (with grad) and exactly the teacher tensors ``needs`` asks for (random values: the
    cost does not depend on them)."""
    head, leaves = make_head(args.head, B, T, V, args.hidden, device, gen, grad=True)
    ids_BT = torch.randint(0, V, (B, T), generator=gen).to(device)
    old_BT = -torch.rand(B, T, generator=gen).to(device) * 5
    t = TeacherScores()
    if needs.teacher_sampled:
        t.sampled_logprobs_BT = -torch.rand(B, T, generator=gen).to(device) * 5
    teacher_bytes = 0
    if needs.teacher_full:
        t.full, teacher_leaves = make_head(args.head, B, T, V, args.hidden, device, gen, grad=False)
        teacher_bytes += sum(x.numel() * x.element_size() for x in teacher_leaves)
    for k, ids_name, lp_name in ((needs.teacher_topk, "topk_ids_BTK", "topk_logprobs_BTK"),
                                 (needs.student_topk, "student_topk_ids_BTK", "at_student_topk_logprobs_BTK")):
        if k:
            setattr(t, ids_name, torch.randint(0, V, (B, T, min(k, V)), generator=gen).to(device))
            setattr(t, lp_name, -torch.rand(B, T, min(k, V), generator=gen).to(device) * 5)
    mask_BT = torch.ones(B, T, dtype=torch.bool, device=device)
    batch = Batch(ids_BT=ids_BT, loss_mask_BT=mask_BT, old_logprobs_BT=old_BT, sampler_logprobs_BT=old_BT.clone(),
                  teacher=t)
    teacher_bytes += sum(x.numel() * x.element_size() for x in vars(t).values() if isinstance(x, torch.Tensor))
    return head, leaves, batch, teacher_bytes


def measure(name: str, V: int, args, device, probe: MemoryProbe) -> dict:
    cfg = EstimatorConfig(**CONFIGS[name], chunk_size=args.chunk_size)
    spec = ESTIMATORS[cfg.name]
    gen = torch.Generator().manual_seed(0)
    head, leaves, batch, teacher_bytes = make_inputs(spec.needs(cfg), args.batch, args.seq, V, args, device, gen)
    probe.baseline()
    start = time.perf_counter()
    loss = spec.loss(head, batch, cfg).loss
    grads = torch.autograd.grad(loss, leaves)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = probe.peak_extra_bytes()
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    assert torch.isfinite(loss), (name, V)
    del head, leaves, batch, loss, grads
    head_label = "dense" if args.head == "dense" else f"projected H={args.hidden}"
    return {"estimator": name, "head": head_label, "V": V, "positions": args.batch * args.seq,
            "teacher_MB": teacher_bytes / MB, "peak_extra_MB": peak / MB, "grad_MB": grad_bytes / MB,
            "workspace_MB": (peak - grad_bytes) / MB, "time_s": seconds}


# --- report -------------------------------------------------------------------------------------------

COLUMNS = ["estimator", "head", "V", "positions", "teacher_MB", "peak_extra_MB", "grad_MB", "workspace_MB", "time_s"]


def format_table(rows: list[dict]) -> str:
    def cell(row, col):
        value = row[col]
        return f"{value:.1f}" if col.endswith("_MB") else f"{value:.2f}" if col == "time_s" else str(value)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def goal_lines(rows: list[dict]) -> list[str]:
    """The goal: topk_rkl (K = 32) at the largest V uses <= 1/10 of full_rkl's extra memory."""
    V = max(r["V"] for r in rows)
    by_name = {r["estimator"]: r for r in rows if r["V"] == V}
    if "topk_rkl_v1" not in by_name or "full_rkl" not in by_name:
        return []
    topk, full = by_name["topk_rkl_v1"], by_name["full_rkl"]
    out = [f"Goal check at V = {V} (topk_rkl V1, K = 32, vs full_rkl; <= 0.10 meets the goal):"]
    for label, key in (("peak extra incl. the gradient", "peak_extra_MB"),
                       ("workspace (peak extra minus the gradient)", "workspace_MB")):
        ratio = topk[key] / max(full[key], 1e-9)
        out.append(f"- {label}: {topk[key]:.1f} / {full[key]:.1f} MB = {ratio:.3f} "
                   f"({'met' if ratio <= 0.1 else 'NOT met'})")
    tot_t, tot_f = topk["peak_extra_MB"] + topk["teacher_MB"], full["peak_extra_MB"] + full["teacher_MB"]
    out.append(f"- with the teacher inputs each needs: {tot_t:.1f} / {tot_f:.1f} MB = {tot_t / tot_f:.3f} "
               f"({'met' if tot_t / tot_f <= 0.1 else 'NOT met'})")
    return out


def write_outputs(rows: list[dict], out: Path, device: torch.device, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "estimators.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                    f"{torch.get_num_threads()}")
    text = [
        "# Estimator memory and time (forward + backward)", "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- machine: {machine}; torch {torch.__version__}; {platform.platform()}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- B = {args.batch}, T = {args.seq}, float32 {args.head} head"
        f"{f' (H = {args.hidden})' if args.head == 'projected' else ''}, chunk_size = {args.chunk_size}; "
        "method: see the docstring of scripts/bench_estimators.py (CPU: VmHWM reset via /proc/self/clear_refs).", "",
        format_table(rows), "", *goal_lines(rows), ""]
    (out / "estimators.md").write_text("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, nargs="+", default=[1024, 32768, 152064])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--head", default="dense", choices=["dense", "projected"],
                        help="student/teacher heads: (B, T, V) logits, or hidden states + output projection")
    parser.add_argument("--hidden", type=int, default=256, help="H of a projected head")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--estimators", nargs="+", default=DEFAULT, choices=list(CONFIGS))
    parser.add_argument("--large-estimators", nargs="+", default=LARGE_DEFAULT, choices=list(CONFIGS),
                        help=f"estimators run at V > {LARGE_V}")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    if args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(MMAP_THRESHOLD):
        # glibc reads this at start-up: re-exec so that every tensor > 64 KiB is its own mmap (honest RSS)
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    probe = MemoryProbe(device)
    for name in args.estimators:  # warm-up: first-call costs out of the timings
        warm = argparse.Namespace(**{**vars(args), "batch": 2, "seq": 8})
        measure(name, 1024, warm, device, probe)
    rows = []
    for V in args.vocab:
        for name in (args.large_estimators if V > LARGE_V else args.estimators):
            rows.append(measure(name, V, args, device, probe))
            r = rows[-1]
            print(f"{name:>14} V={V:>6}: peak extra {r['peak_extra_MB']:8.1f} MB (workspace "
                  f"{r['workspace_MB']:8.1f}), teacher {r['teacher_MB']:8.1f} MB, {r['time_s']:.2f} s", flush=True)
    print(format_table(rows))
    print("\n".join(goal_lines(rows)))
    write_outputs(rows, Path(args.out), device, args)


if __name__ == "__main__":
    main()
