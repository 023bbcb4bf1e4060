"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for pairs that do not fit one device, under torchrun.

    torchrun --standalone --nproc_per_node 8 -m opd_exp train.parallel=fsdp ... hydra.run.dir=outputs/run

    shard_model(pair.student)                      # each decoder layer, then the decoder, over the ranks
    with gathered(pair.student): generate, score   # no-grad forwards on the full weights, any count per rank
    loss.backward(); all_reduce_replicated_grads(pair.student); clip_grad_norm(...); optimizer.step()
    model_state, optim_state = full_states(pair.student, optimizer)   # the checkpoint, whole, on rank 0

Each rank holds 1/world of every parameter as a DTensor shard; a layer's full parameters exist only while it runs
(all-gather before its forward and backward, reduce-scatter of its gradients after), the recipe of Zhao et al.
2023 (arXiv 2304.11277, Sec. 3) in PyTorch's per-parameter form (FSDP2). Every all-gather is a collective, so
every rank must run the same number of sharded forwards in the same order: the training forward runs once per
mini-batch on every rank (opd_exp/train/update.py), and the data-dependent no-grad forwards (generation stops
when a rank's rows end; scoring splits rows by length) run inside :func:`gathered`, where no forward communicates.

Gradients of sharded parameters come out *averaged over the ranks* (the reduce-scatter divides by world), so
the data-parallel ``distributed.all_reduce_grads`` must not run again on them; the replicated output head's
are averaged by :func:`all_reduce_replicated_grads`. The teacher is frozen and stays replicated (no gradients,
no optimizer state: a 7B teacher is 15 GB in bf16 per GPU); to take it off the training GPUs, serve it
(``model.teacher_server``, opd_exp/models/teacher_server.py).
"""

from __future__ import annotations

import contextlib
import sys

import torch

from opd_exp.train import distributed

# torch.distributed.fsdp and .checkpoint are imported where used: ~2 s each per process, which every run would
# pay (update and checkpoint ask is_sharded) though only train.parallel=fsdp needs them


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the children of its first ``ModuleList`` (``model.layers`` of Llama/Qwen2,
    ``gpt_neox.layers``, ``transformer.h``), the unit each rank all-gathers at a time."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    raise ValueError(f"{type(model).__name__}: no ModuleList of decoder layers to shard")


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model``'s FSDP units in pre-order (the root first); none when torch.distributed.fsdp was never
    imported, since nothing can have been sharded then."""
    fsdp_module = sys.modules.get("torch.distributed.fsdp")
    return [] if fsdp_module is None else [m for m in model.modules() if isinstance(m, fsdp_module.FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(_units(model))


def shard_model(model: torch.nn.Module, device_type: str | None = None) -> torch.nn.Module:
    """Shard ``model`` in place over a 1-D mesh of every torchrun process: ``fully_shard`` on each decoder layer
    (resharded after its forward), then on the decoder (``model.base_model``: embeddings and final norm, kept
    gathered from forward to backward, which needs them first), the module
    :func:`opd_exp.models.forward.response_head` calls. The output head stays replicated (the head reads
    ``weight[:V]`` outside any forward, so it must be a plain tensor), and so does an input embedding tied to it
    (Qwen2.5 up to 3B, the tiny pair: ``ignored_params``); average their gradients with
    :func:`all_reduce_replicated_grads`. Parameters keep their dtype; gradients are reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not torch.distributed.is_initialized():
        raise RuntimeError("shard_model needs torchrun's process group: call opd_exp.train.distributed.init()")
    head = model.get_output_embeddings()
    tied = {head.weight} if head is not None and head.weight is model.get_input_embeddings().weight else set()
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    mesh = init_device_mesh(device_type, (distributed.world_size(),))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model.base_model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, ignored_params=tied)
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Inside: ``model``'s full parameters on every rank, forwards without communication (no-grad use only:
    generation, scoring, evaluation). Entering all-gathers every unit (a collective: every rank enters);
    leaving frees the full copies. Between, a rank may run any number of forwards, or none (rank 0 evaluating
    alone), which sharded forwards forbid. Costs the full model's memory per rank while inside, as a colocated
    rollout engine does anyway. Uses ``FSDPModule.unshard`` and ``set_reshard_after_forward(False)``, the
    pattern torch documents for evaluation (torch.distributed.fsdp.FSDPModule). A no-op for an unsharded model."""
    units = _units(model)  # the root (decoder) first: its lazy init must precede its layers'
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model.base_model, recurse=False)  # as shard_model left it


def all_reduce_replicated_grads(model: torch.nn.Module) -> None:
    """Average the gradients of the parameters FSDP does not own (plain tensors: the output head) over the
    ranks, as FSDP's reduce-scatter averages the sharded ones."""
    for param in model.parameters():
        if param.grad is not None and not hasattr(param, "full_tensor"):
            torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.AVG)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for a sharded model, after the gradients are averaged: the global
    2-norm sqrt(sum over ranks of each shard's squared norm + the replicated grads' squared norm), then every
    gradient scaled by min(1, max_norm / (norm + 1e-6)) as torch does. Returns the norm (inf/nan when a
    gradient is not finite: the caller skips the step). A collective."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    shard_sq = _squared_sum([g.to_local() for g in grads if hasattr(g, "to_local")])  # this rank's DTensor rows
    torch.distributed.all_reduce(shard_sq)  # a CPU scalar: gloo (the CPU half of the cpu:gloo,cuda:nccl group)
    norm = float((shard_sq + _squared_sum([g for g in grads if not hasattr(g, "to_local")])).sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for grad in grads:
            grad.mul_(coef)
    return norm


def _squared_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum of squares of every element, a float64 CPU scalar (0 for no tensors)."""
    return sum((t.detach().double().pow(2).sum().cpu() for t in tensors), torch.zeros((), dtype=torch.float64))


def full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict), each whole (unsharded) and on the CPU on rank 0, empty on the
    other ranks (``get_state_dict`` with ``full_state_dict`` and ``cpu_offload``). The model's keys and tensors
    are those of the unsharded model; the optimizer's state is keyed by parameter name. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # ~2 s to import

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                     optim_state: dict) -> None:
    """Load :func:`full_states`' dicts (every rank holds them whole, read from the checkpoint) into the sharded
    model and its optimizer; each rank keeps its shard. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer gathered whole on every rank (``DTensor.full_tensor``), on the CPU: for a
    comparison with an unsharded model (tests/test_fsdp.py). A collective: all ranks call it."""
    out = {}
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        out[name] = full.detach().cpu()
    return out
