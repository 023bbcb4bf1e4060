"""A teacher scored by a vLLM server: its top-K ``prompt_logprobs`` of prompt + response ids -> TeacherScores.

    vllm serve open-thoughts/OpenThinker3-7B --max-logprobs 32 --port 8000       # other GPUs or another node
    opd-exp model=paper_math model.teacher_server=http://teacher:8000 eval.teacher=false task=benchmark

The teacher's weights then never load on the training GPUs. Each row (the prompt's real tokens, then the
response up to its last real position) goes to vLLM's OpenAI-compatible ``POST /v1/completions`` as token ids
(``prompt`` = a list of id lists) with ``prompt_logprobs=K`` and ``max_tokens=1`` (the one generated token is
discarded; vLLM accepts ``max_tokens=0`` only with ``echo`` in recent versions, 1 everywhere). The response's
``choices[i].prompt_logprobs`` holds, per prompt position, a dict ``{token id: {logprob, rank, decoded_token}}``
of the position's top-K ids plus the actual token (K or K + 1 entries; the first position has none, ``null``):
vLLM's ``CompletionResponseChoice`` and ``Logprob`` (vllm/entrypoints/openai/protocol.py,
vllm/logprobs.py). Position ``len(prompt) + t`` predicts response token t, which is the (B, T) / (B, T, K)
layout of :class:`~opd_exp.objectives.batch.TeacherScores` (:func:`scores_from_prompt_logprobs`).
``echo=true`` is not used: it returns OpenAI-style text log-probs keyed by token strings, not ids.

What the log-probs mean. vLLM's default ``--logprobs-mode raw_logprobs`` gives the model's log-softmax at
temperature 1, which is the target log q; a server started with ``processed_logprobs`` applies the request's
sampling settings first (vLLM's engine-args docs: "Processed means the values after applying all processors,
including temperature and top_k/top_p"; prompt log-probs follow the mode since vllm-project/vllm#47680), so
every request sets temperature 1 and top-p 1, under which both modes agree. The softmax runs over the
checkpoint's whole logits width (padded embedding rows included, whose mass is ~0 for a trained model); a
padded id in the top-K is an error. The server must serve a teacher with the student's vocabulary: the teacher
scores the student's ids, and no tokenizer audit is possible without loading the teacher's tokenizer.

The cap. vLLM refuses ``prompt_logprobs`` above the server's ``--max-logprobs`` (default 20, the OpenAI
Chat Completions limit; vLLM's engine args), so K = 32 (the paper's) or the diagnostics' ``train.diag_top_k``
(32) needs ``--max-logprobs 32`` or more: the refusal, or a response with fewer than K entries, raises
:class:`TeacherServerError` naming the setting.

What a server cannot give: the full distribution (``full_rkl``, ``forward_kl``, ``jsd``, ``vopd``'s full value)
and log q at the student's top-K ids (student-support variants); :func:`unservable` names them, and the run
stops before loading anything.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from opd_exp.objectives import Needs, TeacherScores

DEFAULT_MAX_LOGPROBS = 20  # vLLM's ModelConfig.max_logprobs default (engine arg --max-logprobs)


class TeacherServerError(RuntimeError):
    """The server is unreachable, refuses a request, or returns something other than the scores asked for."""


def unservable(needs: Needs) -> str | None:
    """Why an objective with these ``needs`` cannot be scored by a server, or None when it can."""
    if needs.teacher_full:
        return "needs the teacher's full distribution over the vocabulary; a server returns its top-K log-probs"
    if needs.student_topk:
        return "needs log q at the student's top-K ids; a server returns the teacher's own top-K"
    if needs.rollout_policy != "student":
        return "samples its rollouts from the teacher; a served teacher only scores"
    return None


def scores_from_prompt_logprobs(prompt_logprobs_R: list[list[dict | None]], prompt_len_R: list[int],
                                ids_BT: torch.Tensor, mask_BT: torch.Tensor, top_k: int, vocab_size: int,
                                url: str = "the server") -> TeacherScores:
    """vLLM's per-row ``prompt_logprobs`` -> (B, T) and (B, T, K) teacher tensors.

    prompt_logprobs_R: per row, one entry per position of prompt + response: None (the first position) or
                       ``{str(token id): {"logprob": float, "rank": int, ...}}``
    prompt_len_R:      per row, its prompt's length (response position t is entry ``prompt_len + t``)
    ids_BT, mask_BT:   long / bool, the response tokens and where they are real; rows with entries for every
                       real position
    Returns ``sampled_logprobs_BT`` (float32, log q(y_t); 0 where ``mask_BT`` is False) and, when ``top_k`` > 0,
    ``topk_ids_BTK`` (long, by decreasing log q) and ``topk_logprobs_BTK`` (float32); every tensor is 0 where
    ``mask_BT`` is False (outside every loss and diagnostic mask; finite, so no NaN can leak from there).
    """
    B, T = ids_BT.shape
    sampled_BT = torch.zeros((B, T), dtype=torch.float32)
    topk_ids_BTK = torch.zeros((B, T, top_k), dtype=torch.long)
    topk_logprobs_BTK = torch.zeros((B, T, top_k), dtype=torch.float32)
    for b in range(B):
        for t in torch.nonzero(mask_BT[b]).flatten().tolist():
            entry = prompt_logprobs_R[b][prompt_len_R[b] + t]
            token = int(ids_BT[b, t])
            if entry is None or str(token) not in entry:
                raise TeacherServerError(f"{url}: no log-prob of response token {token} at row {b}, position {t}")
            sampled_BT[b, t] = entry[str(token)]["logprob"]
            if not top_k:
                continue
            ranked = sorted(((v["logprob"], int(k)) for k, v in entry.items()), reverse=True)[:top_k]
            if len(ranked) < top_k:
                raise TeacherServerError(
                    f"{url}: {len(ranked)} prompt log-probs per position, {top_k} asked (estimator.top_k or "
                    f"train.diag_top_k): start the server with --max-logprobs {top_k} or more "
                    f"(vLLM's default is {DEFAULT_MAX_LOGPROBS})")
            if (padded := max(i for _, i in ranked)) >= vocab_size:
                raise TeacherServerError(f"{url}: id {padded} in the teacher's top-{top_k} is a padded embedding "
                                         f"row (the tokenizer has {vocab_size} ids)")
            topk_logprobs_BTK[b, t] = torch.tensor([lp for lp, _ in ranked], dtype=torch.float32)
            topk_ids_BTK[b, t] = torch.tensor([i for _, i in ranked], dtype=torch.long)
    if not top_k:
        return TeacherScores(sampled_logprobs_BT=sampled_BT)
    return TeacherScores(sampled_logprobs_BT=sampled_BT, topk_ids_BTK=topk_ids_BTK,
                         topk_logprobs_BTK=topk_logprobs_BTK)


@dataclass
class ServedTeacher:
    """The teacher of a pair whose scores come from a vLLM server at ``url`` (``model.teacher_server``).

    ``score`` takes the layout :func:`opd_exp.models.forward.response_head` takes (left-padded prompts,
    right-padded responses) and sends ``rows_per_request`` rows per request. The JSON is large: ~60 bytes per
    (position, id) entry, so K = 32 at 16k-token responses is ~30 MB per row (an estimate: 16,384 x 33 x 60
    bytes), hence a few rows per request."""

    url: str
    timeout_s: float = 600.0
    rows_per_request: int = 8
    _model_name: str | None = None

    def _request(self, path: str, body: dict | None = None) -> dict:
        url = self.url.rstrip("/") + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:  # vLLM's refusal: {"error": {"message": ...}} or {"message": ...}
            raw = err.read().decode(errors="replace")
            try:
                payload = json.loads(raw)
                message = (payload.get("error") or payload).get("message", raw)
            except (json.JSONDecodeError, AttributeError):
                message = raw
            hint = (f"; start the server with --max-logprobs >= the K asked (vLLM's default is "
                    f"{DEFAULT_MAX_LOGPROBS})" if "logprobs" in message else "")
            raise TeacherServerError(f"teacher server {url}: HTTP {err.code}: {message.strip()}{hint}") from None
        except (urllib.error.URLError, OSError) as err:
            raise TeacherServerError(f"teacher server {url}: unreachable ({err}); check model.teacher_server "
                                     "and that `vllm serve` is running") from None

    @property
    def model_name(self) -> str:
        """The served model's name (``GET /v1/models``), which every completion request must name."""
        if self._model_name is None:
            models = self._request("/v1/models").get("data") or []
            if not models:
                raise TeacherServerError(f"teacher server {self.url}: /v1/models lists no model")
            self._model_name = models[0]["id"]
        return self._model_name

    @torch.no_grad()
    def score(self, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor, ids_BT: torch.Tensor,
              attention_mask_BT: torch.Tensor, top_k: int, vocab_size: int) -> TeacherScores:
        """The teacher's log q of every real response token and, for ``top_k`` > 0, its top-K (CPU tensors)."""
        ids_BT, mask_BT = ids_BT.cpu(), attention_mask_BT.cpu()
        T = ids_BT.shape[1]
        extent_B = torch.where(mask_BT.any(-1), T - mask_BT.flip(-1).int().argmax(-1), 0)
        prompts = [prompt_ids_BP[b][prompt_mask_BP[b]].tolist() for b in range(len(ids_BT))]
        parts = []
        for start in range(0, len(prompts), self.rows_per_request):  # each request's JSON turned into tensors
            rows = slice(start, start + self.rows_per_request)   # at once: one request's worth in memory
            seqs = [p + ids_BT[b, :int(extent_B[b])].tolist() for b, p in enumerate(prompts[rows], start=start)]
            body = {"model": self.model_name, "prompt": seqs, "max_tokens": 1, "prompt_logprobs": top_k,
                    "temperature": 1.0, "top_p": 1.0}
            choices = sorted(self._request("/v1/completions", body).get("choices") or [], key=lambda c: c["index"])
            if len(choices) != len(seqs) or any(c.get("prompt_logprobs") is None for c in choices):
                raise TeacherServerError(f"teacher server {self.url}: {len(choices)} choices with prompt_logprobs "
                                         f"for {len(seqs)} prompts (is it a vLLM server?)")
            parts.append(scores_from_prompt_logprobs([c["prompt_logprobs"] for c in choices],
                                                     [len(p) for p in prompts[rows]], ids_BT[rows], mask_BT[rows],
                                                     top_k, vocab_size, url=self.url))
        names = ("sampled_logprobs_BT", "topk_ids_BTK", "topk_logprobs_BTK")[:3 if top_k else 1]
        return TeacherScores(**{name: torch.cat([getattr(p, name) for p in parts]) for name in names})
