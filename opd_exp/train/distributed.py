"""Data-parallel training of one run across the processes that torchrun starts (gloo on CPU, NCCL on CUDA).

    torchrun --standalone --nproc_per_node 2 -m opd_exp experiment=smoke threads=1 hydra.run.dir=outputs/ddp

Every rank loads the same pair and takes its contiguous shard of each step's prompts; each samples with its own
seed (seed + 100003 * rank), so a 2-process loss curve is another sample of the same distribution as the
1-process one (close within sampling noise, not equal). Each rank's mini-batch is mini_batch_size / world rows;
gradients are averaged across ranks before clipping and the optimizer step, so every rank keeps identical weights.
Metrics are averaged across ranks; rank 0 alone writes the run dir (metrics, summary, checkpoints) and evaluates.
Without torchrun (WORLD_SIZE unset) every helper here is a no-op and the run is bit-identical to before.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

# how long a rank waits at a collective: rank 0 evaluates alone while the others wait at their next one, which
# takes hours for a 7B pair at 16k-token responses (the README's GPU recipe), past torch's default 10-30 min
WAIT = datetime.timedelta(hours=24)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group from torchrun's env vars (once; a no-op for a single process). Objects and flags go
    over gloo; on a CUDA machine CUDA tensors go over NCCL, set up lazily (a CPU run there never touches it)."""
    if world_size() == 1 or dist.is_initialized():
        return
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=WAIT)
    atexit.register(_leave)  # after an error or an interruption; a run that ends normally calls finish()


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> NoReturn:
    """Leave together and end the process: wait until every rank is here (rank 0 evaluates alone at the end of a
    run while the others are done), flush, and exit 0 without the interpreter's teardown (``os._exit``).

    Tearing the group down at exit aborted a rank now and then under load (SIGABRT, "terminate called without an
    active exception": in CI on 2026-12-03 once rank 1 exiting while rank 0 evaluated, once rank 0 after a barrier
    and ``destroy_process_group``): gloo's worker threads can outlive the group and meet a half-finalized
    interpreter (pytorch/pytorch#179291). Every file the run writes is closed by then; sockets close with the
    process. A run that fails or is interrupted never gets here (it exits through ``_leave``)."""
    if dist.is_initialized():
        try:
            gather(True)  # a barrier over gloo (CPU objects), on a CPU or a CUDA run alike
        except RuntimeError:  # a rank already left (rank 0 exits 143 when interrupted): nothing to wait for
            pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU (torchrun's LOCAL_RANK) when the run trains on CUDA; else ``device``."""
    if device.type != "cuda" or world_size() == 1:
        return device
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def shard(items: list) -> list:
    """This rank's contiguous share of ``items`` (its length is a multiple of the world size; see train.run)."""
    n = len(items) // world_size()
    return items[rank() * n:(rank() + 1) * n]


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    return any(gather(bool(flag)))


def all_reduce_grads(model: torch.nn.Module, ok: bool) -> bool:
    """Average the gradients across ranks in place; False on every rank when any rank's loss was non-finite
    (then every rank skips the update together and the weights stay identical)."""
    if world_size() == 1:
        return ok
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if ok and p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [grads[0].new_full((1,), float(not ok)).float()])
    dist.all_reduce(flat)
    if flat[-1].item() > 0:
        return False
    flat /= world_size()
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
    return True


def all_reduce_mean(metrics: dict[str, float], summed: tuple[str, ...] = (),
                    from_main: tuple[str, ...] = ()) -> dict[str, float]:
    """The ranks' mean of each metric, the sum for the ``summed`` counts, rank 0's value for keys starting with
    ``from_main`` (statistics that do not average, e.g. token ids). A key missing on a rank is averaged over the
    ranks that have it. The result is identical on every rank, so decisions taken on it agree."""
    if world_size() == 1:
        return metrics
    per_rank = gather(metrics)
    out = {}
    for k in dict.fromkeys(k for m in per_rank for k in m):
        values = [float(m[k]) for m in per_rank if k in m]
        if k.startswith(from_main) and k in per_rank[0]:
            out[k] = float(per_rank[0][k])
        else:
            out[k] = sum(values) if k in summed else sum(values) / len(values)
    return out


def check_in_sync(model: torch.nn.Module) -> str:
    """The replicated weights' sha1, printed by every rank; raises if the ranks' differ (a no-op for one process).
    A sharded student's (FSDP2) DTensor shards differ by design and are left out: its replicated output head is
    compared."""
    if world_size() == 1:
        return ""
    flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()
                      if not hasattr(p, "full_tensor")])
    digest = hashlib.sha1(flat.numpy().tobytes()).hexdigest()[:16]
    print(f"[opd-exp] rank {rank()}/{world_size()}: weights sha1 {digest}", flush=True)
    if len(set(gather(digest))) > 1:
        raise RuntimeError("data-parallel ranks ended with different weights (see the sha1 lines above)")
    return digest
