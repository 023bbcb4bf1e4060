"""FSDP2 (opd_exp/train/fsdp.py) under torchrun with 2 CPU processes on gloo: one optimizer step on a sharded
tiny causal LM (an HF layout without transformers), each rank with half the batch, equals the same step on one
process with the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

WORKER = r'''
import sys, types, torch
from opd_exp.models.forward import response_head
from opd_exp.objectives.kernels import selected_logprobs
from opd_exp.train import distributed, fsdp

class Decoder(torch.nn.Module):  # a causal LM's layout without transformers (fast to import): embed, layers, norm
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(37, 32)
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh())
                                          for _ in range(2))
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, input_ids, attention_mask, position_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h).cumsum(1) / position_ids[..., None].add(1)  # causal mixing along positions
        return types.SimpleNamespace(last_hidden_state=self.norm(h))

class LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base_model, self.lm_head = Decoder(), torch.nn.Linear(32, 37, bias=False)
    def get_input_embeddings(self):
        return self.base_model.embed
    def get_output_embeddings(self):
        return self.lm_head

def model():
    torch.manual_seed(0)
    return LM()

def loss_of(m, ids_BL):  # the loop's path: response_head + the chunked sampled-token log-prob kernel
    P = 3
    ones = torch.ones_like(ids_BL, dtype=torch.bool)
    head = response_head(m, ids_BL[:, :P], ones[:, :P], ids_BL[:, P:], ones[:, P:], vocab_size=33)
    return -selected_logprobs(head, ids_BL[:, P:, None] % 33, chunk_size=4).mean()

distributed.init()
rank, world = distributed.rank(), distributed.world_size()
torch.manual_seed(1)
ids_BL = torch.randint(0, 33, (4, 9))
ref = model()
ref_loss = loss_of(ref, ids_BL)
ref_loss.backward()
torch.optim.SGD(ref.parameters(), lr=0.5).step()

sharded = fsdp.shard_model(model(), device_type="cpu")
opt = torch.optim.SGD(sharded.parameters(), lr=0.5)
rows = slice(rank * 2, rank * 2 + 2)  # each rank: its half of the batch
local = loss_of(sharded, ids_BL[rows])
local.backward()
fsdp.all_reduce_replicated_grads(sharded)
opt.step()
n_sharded = sum(hasattr(p, "full_tensor") for p in sharded.parameters())
full = fsdp.full_state_dict(sharded)
worst = max(float((full[k] - v).abs().max()) for k, v in ref.state_dict().items())
total = distributed.all_reduce_mean({"loss": float(local)})["loss"]
with open(f"{sys.argv[1]}/rank{rank}.txt", "w") as out:  # one file per rank: stdout lines would interleave
    out.write(f"rank {rank}/{world} sharded {n_sharded} loss {total:.6f} ref {float(ref_loss):.6f} "
              f"max_diff {worst:.2e}")
'''


@pytest.mark.slow
def test_fsdp2_step_equals_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    for line in lines:
        fields = line.split()
        assert int(fields[3]) > 0  # some parameters really are sharded DTensors
        assert abs(float(fields[5]) - float(fields[7])) < 1e-5  # mean of the ranks' losses = the full batch's
        assert float(fields[9]) < 1e-5  # parameters after the step equal one process's
