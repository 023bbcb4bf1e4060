"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for pairs that do not fit one device, under torchrun.

    distributed.init()                                   # torchrun's process group (opd_exp/train/distributed.py)
    shard_model(pair.student, mixed_bf16=True)           # each decoder layer, then the decoder, over the ranks
    loss.backward(); all_reduce_replicated_grads(pair.student); optimizer.step()

Each rank holds 1/world of every parameter as a DTensor shard; a layer's full parameters exist only while it runs
(all-gather before its forward and backward, reduce-scatter of its gradients after), the recipe of Zhao et al.
2023 (arXiv 2304.11277, Sec. 3) in PyTorch's per-parameter form (FSDP2). Every rank must run the same number of
forward passes (generation included) in the same order, since each layer's all-gather is a collective.

Gradients of sharded parameters come out *averaged over the ranks* (the reduce-scatter divides by world), so
the data-parallel ``distributed.all_reduce_grads`` must not run again on them; the replicated output head's
are averaged by :func:`all_reduce_replicated_grads`. Not wired into the training loop yet: this module and
tests/test_fsdp.py give the sharding and its parity with one process (see the README's GPU recipe).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from opd_exp.train import distributed


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the children of its first ``ModuleList`` (``model.layers`` of Llama/Qwen2,
    ``gpt_neox.layers``, ``transformer.h``), the unit each rank all-gathers at a time."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    raise ValueError(f"{type(model).__name__}: no ModuleList of decoder layers to shard")


def shard_model(model: torch.nn.Module, *, mixed_bf16: bool = False, reshard_after_forward: bool = True,
                device_type: str | None = None) -> torch.nn.Module:
    """Shard ``model`` in place over a 1-D mesh of every torchrun process: ``fully_shard`` on each decoder layer,
    then on the decoder (``model.base_model``: embeddings and final norm), which is the module
    :func:`opd_exp.models.forward.response_head` calls. ``reshard_after_forward`` applies to the layers (the
    decoder's own small parameters stay gathered until its backward). The output head stays replicated (the head reads
    ``weight[:V]`` outside any forward, so it must be a plain tensor); average its gradient with
    :func:`all_reduce_replicated_grads`. ``mixed_bf16``: compute in bf16, reduce gradients in fp32."""
    if not torch.distributed.is_initialized():
        raise RuntimeError("shard_model needs torchrun's process group: call opd_exp.train.distributed.init()")
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        raise ValueError(f"{type(model).__name__}: tied input/output embeddings cannot be sharded with a "
                         "replicated head; untie them (config.tie_word_embeddings=false) before sharding")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    mesh = init_device_mesh(device_type, (distributed.world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16
              else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the outermost unit keeps its parameters (embeddings, final norm) gathered from forward to backward, which
    # needs them first; resharding them here leaves backward with freed storage
    fully_shard(model.base_model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def all_reduce_replicated_grads(model: torch.nn.Module) -> None:
    """Average the gradients of the parameters FSDP does not own (plain tensors: the output head) over the
    ranks, as FSDP's reduce-scatter averages the sharded ones."""
    for param in model.parameters():
        if param.grad is not None and not hasattr(param, "full_tensor"):
            torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.AVG)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer gathered whole on every rank (``DTensor.full_tensor``), on the CPU: for a
    checkpoint written by rank 0 or a comparison with an unsharded model. A collective: all ranks call it."""
    out = {}
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        out[name] = full.detach().cpu()
    return out
