"""The Batch: the one object a step passes from collect to update (ARCHITECTURE.md, "One step, as data").

B rows (trajectories), each a left-padded prompt of P tokens followed by a response region of T tokens.
In a multi-turn episode the response region holds the policy's actions *and* the environment's observations:
the models see both (``attention_mask_BT``), only actions are trained (``loss_mask_BT``).

Position t of the response region is predicted from the prefix before it: ``ids_BT[:, t]`` is the token whose
log-prob every ``*_BT`` tensor holds. Objectives read ``ids_BT``, ``loss_mask_BT``, ``old_logprobs_BT``,
``sampler_logprobs_BT`` and ``teacher``; the other fields belong to the plumbing (models, diagnostics).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from opd_exp.objectives.head import LogitsHead


@dataclass
class TeacherScores:
    """The teacher's view of the response positions: exactly what the objective's ``Needs`` ask, (B, T, K) at
    most. Log-probs are float32, normalised over the teacher tokenizer's full vocabulary (log q), no grad.

    sampled_logprobs_BT:           log q(y_t) of the sampled tokens
    topk_ids_BTK, topk_logprobs_BTK:  the teacher's top-K ids (long, < V) and log q at them
    student_topk_ids_BTK, at_student_topk_logprobs_BTK:  pi_old's top-K ids and log q at them
    full:                          the teacher's hidden states and output head, for full-vocabulary objectives
                                   (the (B, T, V) log-probs are recomputed chunk by chunk, never stored)
    """

    sampled_logprobs_BT: torch.Tensor | None = None
    topk_ids_BTK: torch.Tensor | None = None
    topk_logprobs_BTK: torch.Tensor | None = None
    student_topk_ids_BTK: torch.Tensor | None = None
    at_student_topk_logprobs_BTK: torch.Tensor | None = None
    full: LogitsHead | None = None

    def rows(self, rows, device: torch.device | str | None = None) -> TeacherScores:
        def pick(x):
            if x is None:
                return None
            if isinstance(x, LogitsHead):
                head = x.rows(rows)
                return dataclasses.replace(head, hidden_BTH=head.hidden_BTH.to(device)) if device else head
            return x[rows].to(device) if device else x[rows]
        return TeacherScores(**{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclass
class Batch:
    """One rollout batch (or a mini-batch of its rows).

    ids_BT:              long, response-region tokens (pad where ``attention_mask_BT`` is False)
    loss_mask_BT:        bool, positions in the loss: sampled by the policy, minus masked special tokens, minus
                         what a task excludes (observations); an objective never looks outside it
    old_logprobs_BT:     float32, log pi_old(y_t) at the sampling temperature (no top-p), no grad: PPO's pi_old
    sampler_logprobs_BT: float32, log-prob under the distribution actually sampled (temperature and top-p
                         applied); 0 where nothing was sampled (observations, padding)
    teacher:             TeacherScores
    prompt_ids_BP, prompt_mask_BP:  long / bool, the left-padded prompt (what comes before the response region)
    attention_mask_BT:   bool, real tokens of the response region (actions and observations): what models see
    task_B:              long, which task (and teacher) each row belongs to (index into the run's task list)
    prompt_index_B:      long, which prompt of the step each row answers
    truncated_B:         bool, the response hit its length cap without an end token
    """

    ids_BT: torch.Tensor
    loss_mask_BT: torch.Tensor
    old_logprobs_BT: torch.Tensor
    sampler_logprobs_BT: torch.Tensor | None = None
    teacher: TeacherScores = field(default_factory=TeacherScores)
    prompt_ids_BP: torch.Tensor | None = None
    prompt_mask_BP: torch.Tensor | None = None
    attention_mask_BT: torch.Tensor | None = None
    task_B: torch.Tensor | None = None
    prompt_index_B: torch.Tensor | None = None
    truncated_B: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.ids_BT.shape[0]

    def rows(self, rows, device: torch.device | str | None = None) -> Batch:
        """A mini-batch: the given rows, moved to ``device`` when one is given."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, TeacherScores):
                out[f.name] = value.rows(rows, device)
            elif value is None:
                out[f.name] = None
            else:
                out[f.name] = value[rows].to(device) if device else value[rows]
        return Batch(**out)
