"""Multi-turn rollouts: the policy writes an action, the environment's reply is appended as observation tokens.

    ro, episodes = play(backend, model, tokenizer, prompts, make_episode, sampling, stop_ids=..., pad_id=...,
                        vocab_size=..., max_turns=8, max_action_tokens=12)

Each row of a turn is one ``backend.generate`` call's row (the whole context so far is its prompt, at most
``max_action_tokens`` new tokens, stopping at a stop id); the action's text (stop id removed) goes to the
row's episode; unless the game is over or the turns are spent, the observation is rendered as the chat
template's next user turn and generation prompt (:func:`turn_ids`) and appended. The returned
:class:`~opd_exp.rollout.base.Rollout` holds, after the first prompt, every action and observation token:

    completion_mask_BT  actions and observations (what the models see)
    action_mask_BT      actions only (what is trained: observations get exactly zero gradient)
    sample_logprobs_BT  the sampled actions' log-probs (0 on observations)
    truncated_B         the episode was not over (won or lost) within ``max_turns``
    after_rejected_BT   what follows the first action the environment rejected (``Episode.invalid`` rose)

Positions follow the attention mask, so the teacher and pi_old, scoring the same (prompt, completion) row
later, see exactly the contexts the actions were sampled in (as in verl-agent's multi-turn rollouts,
arXiv 2505.10978, where observations are in the context and out of the loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from opd_exp.config import SamplingConfig
from opd_exp.rollout.base import Rollout, RolloutBackend, left_pad


def turn_ids(tokenizer, observation: str) -> list[int]:
    """Token ids that follow an assistant turn's end token to give ``observation`` as the next user turn and
    open the assistant's reply: the chat template's rendering of [user, assistant, user(observation)] with the
    generation prompt, minus its rendering of [user, assistant]."""
    head = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    before = tokenizer.apply_chat_template(head, tokenize=False)
    after = tokenizer.apply_chat_template(head + [{"role": "user", "content": observation}], tokenize=False,
                                          add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("the chat template renders an earlier turn differently once a user turn follows")
    return tokenizer(after[len(before):], add_special_tokens=False)["input_ids"]


@torch.no_grad()
def play(backend: RolloutBackend, model, tokenizer, prompts: list[list[int]], make_episode: list[Callable],
         sampling: SamplingConfig, *, stop_ids: list[int], pad_id: int, vocab_size: int, max_turns: int,
         max_action_tokens: int, n_per_prompt: int | None = None, greedy: bool = False
         ) -> tuple[Rollout, list]:
    """Play ``n_per_prompt`` episodes per prompt (``make_episode[i]()`` makes prompt i's fresh episode, whose
    first observation ``prompts[i]`` already holds); rows grouped by prompt. Returns the Rollout (see the
    module docstring) and the B episodes, played (``won``, ``steps``, ``invalid``)."""
    n = sampling.rollouts_per_prompt if n_per_prompt is None else n_per_prompt
    rows = [i for i in range(len(prompts)) for _ in range(n)]
    episodes = [make_episode[i]() for i in rows]
    for ep in episodes:
        ep.reset()
    context = [list(prompts[i]) for i in rows]
    ids: list[list[int]] = [[] for _ in rows]
    acts: list[list[bool]] = [[] for _ in rows]
    logps: list[list[float]] = [[] for _ in rows]
    over = [False] * len(rows)
    rejected_from: list[int | None] = [None] * len(rows)  # a row's length once its first rejected action is in
    turn_sampling = replace(sampling, max_new_tokens=max_action_tokens)
    stops = set(stop_ids)
    for turn in range(max_turns):
        active = [r for r in range(len(rows)) if not over[r]]
        if not active:
            break
        ro = backend.generate(model, [context[r] for r in active], turn_sampling, stop_ids=stop_ids, pad_id=pad_id,
                              vocab_size=vocab_size, n_per_prompt=1, greedy=greedy)
        for j, r in enumerate(active):
            width = int(ro.completion_mask_BT[j].sum())
            action = ro.completion_ids_BT[j, :width].tolist()
            ids[r] += action
            acts[r] += [True] * width
            logps[r] += ro.sample_logprobs_BT[j, :width].tolist()
            text = tokenizer.decode([t for t in action if t not in stops], skip_special_tokens=True)
            observation, over[r] = episodes[r].step(text)
            if rejected_from[r] is None and episodes[r].invalid:
                rejected_from[r] = len(ids[r])
            if over[r] or turn == max_turns - 1:
                continue
            obs = turn_ids(tokenizer, observation)
            ids[r] += obs
            acts[r] += [False] * len(obs)
            logps[r] += [0.0] * len(obs)
            context[r] += action + obs
    prompt_ids, prompt_mask = left_pad([list(prompts[i]) for i in rows], pad_id)
    width = max(1, max(len(x) for x in ids))
    completion_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    action_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    sample_logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
    after_rejected = torch.zeros((len(rows), width), dtype=torch.bool)
    for r in range(len(rows)):
        k = len(ids[r])
        completion_ids[r, :k] = torch.tensor(ids[r], dtype=torch.long)
        completion_mask[r, :k] = True
        action_mask[r, :k] = torch.tensor(acts[r], dtype=torch.bool)
        sample_logprobs[r, :k] = torch.tensor(logps[r], dtype=torch.float32)
        if rejected_from[r] is not None:
            after_rejected[r, rejected_from[r]:k] = True
    truncated = torch.tensor([not o for o in over], dtype=torch.bool)
    rollout = Rollout(prompt_ids_BP=prompt_ids, prompt_mask_BP=prompt_mask, completion_ids_BT=completion_ids,
                      completion_mask_BT=completion_mask, sample_logprobs_BT=sample_logprobs, truncated_B=truncated,
                      prompt_index_B=torch.tensor(rows, dtype=torch.long), action_mask_BT=action_mask,
                      after_rejected_BT=after_rejected)
    return rollout, episodes
