"""Tokenizer / special-token audit of a (teacher, student) pair, run before training (failure mode 3).

On-policy distillation has the teacher score the student's own token ids. That is only meaningful when both
models read those ids the same way: the same vocabulary, the same special tokens (EOS above all), the same chat
template and the same split of the strings the task relies on (think delimiters, the end-of-answer marker).
The paper's Fig. 5 shows what a mismatch costs even for a teacher fine-tuned from the student's base: the
student writes "<think>" as '<' 'think' '>' and ends with '<|im_end|>' (log-probs -0.07 and -0.00), which the
teacher scores -19.16 and -58.71.

- :func:`audit_tokenizers` compares the two tokenizers and returns an :class:`AuditReport`.
- :func:`check_pair_compatible` stops a run whose vocabularies differ when no mapping is configured (shared
  vocabulary with special-token differences only warns: special-token masking is the paper's fix for those).
- :func:`pair_probes`: the strings probed, read from the pair (each side's own end token, the think delimiters
  of either vocabulary) and the task (its response convention's markers, when it has one).
- :func:`score_side_by_side` / :func:`format_side_by_side` print the Fig. 5 table for any string.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

log = logging.getLogger(__name__)

SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
DEFAULT_CONVERSATION = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."},
]


@dataclass
class AuditReport:
    """What :func:`audit_tokenizers` found. ``mismatches`` holds one human-readable line per problem."""

    vocab_sizes: tuple[int, int]  # (teacher, student), including added tokens
    n_vocab_diff: int  # token strings whose id differs or that exist on one side only
    shared_vocab: bool  # same size and the same token -> id map
    special_rows: list[tuple[str, str, str]] = field(default_factory=list)  # (name, teacher, student)
    probe_rows: list[tuple[str, str, str]] = field(default_factory=list)  # (probe, teacher split, student split)
    template_note: str = ""  # how the chat-template check went
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing differs."""
        return not self.mismatches

    def format(self) -> str:
        """A plain-text report: verdict, vocabulary, special tokens, chat template, probes, then the problems."""
        verdict = "OK: the pair is compatible" if self.ok else f"{len(self.mismatches)} MISMATCH(ES)"
        lines = [f"tokenizer audit (teacher vs student): {verdict}",
                 f"  vocabulary: sizes {self.vocab_sizes[0]} vs {self.vocab_sizes[1]}, "
                 f"{self.n_vocab_diff} differing entries -> {'shared' if self.shared_vocab else 'NOT shared'}"]
        lines += _table("special tokens", ("name", "teacher", "student"), self.special_rows)
        lines.append(f"  chat template: {self.template_note}")
        lines += _table("probes (ids and pieces)", ("probe", "teacher", "student"), self.probe_rows)
        lines += ["  problems:"] + [f"    - {m}" for m in self.mismatches] if self.mismatches else []
        return "\n".join(lines)


def _table(title: str, header: tuple[str, str, str], rows: list[tuple[str, str, str]]) -> list[str]:
    if not rows:
        return [f"  {title}: none"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    mark = ["" if r[1] == r[2] else "  <-- differs" for r in rows]
    return [f"  {title}:"] + [
        ("    " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))).rstrip() + m
        for r, m in zip([header, *rows], ["", *mark], strict=True)]


def _describe(tok: Any, ids: list[int]) -> str:
    """``[ids] ['piece', ...]`` for a report line."""
    return f"{ids} {tok.convert_ids_to_tokens(ids)}"


# --- the individual checks ------------------------------------------------------------------------------------


def compare_vocab(teacher_tok: Any, student_tok: Any) -> tuple[tuple[int, int], int, list[str]]:
    """``(sizes, n_diff, mismatch_lines)``: n_diff counts token strings (over the union of both vocabularies,
    added tokens included) whose id differs or that one side lacks."""
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    sizes = (len(teacher_tok), len(student_tok))
    differing = sorted(t for t in t_vocab.keys() | s_vocab.keys() if t_vocab.get(t) != s_vocab.get(t))
    lines = []
    if sizes[0] != sizes[1]:
        lines.append(f"vocabulary size differs: teacher {sizes[0]} vs student {sizes[1]}")
    if differing:
        examples = ", ".join(f"{t!r}: {t_vocab.get(t)} vs {s_vocab.get(t)}" for t in differing[:5])
        lines.append(f"{len(differing)} vocabulary entries map to different ids (teacher vs student), "
                     f"e.g. {examples}")
    return sizes, len(differing), lines


def compare_special_tokens(teacher_tok: Any, student_tok: Any) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Rows and mismatch lines for the special tokens: each role (bos/eos/pad/unk) must be the same string
    with the same id on both sides, and every other special token of either side must exist on the other,
    with the same id, and be special there too (else one side splits what the other keeps whole)."""
    rows, lines = [], []
    for role in SPECIAL_ROLES:
        t = (getattr(teacher_tok, role, None), getattr(teacher_tok, f"{role}_id", None))
        s = (getattr(student_tok, role, None), getattr(student_tok, f"{role}_id", None))
        rows.append((role, f"{t[0]!r} ({t[1]})", f"{s[0]!r} ({s[1]})"))
        if t != s:
            what = "EOS" if role == "eos_token" else role
            lines.append(f"{what} differs: teacher {t[0]!r} (id {t[1]}) vs student {s[0]!r} (id {s[1]})")
    role_strings = {getattr(tok, r, None) for tok in (teacher_tok, student_tok) for r in SPECIAL_ROLES}
    t_special, s_special = set(teacher_tok.all_special_tokens), set(student_tok.all_special_tokens)
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    for text in sorted((t_special | s_special) - role_strings):
        t_id, s_id = t_vocab.get(text), s_vocab.get(text)
        t_kind = "special" if text in t_special else "plain" if t_id is not None else "absent"
        s_kind = "special" if text in s_special else "plain" if s_id is not None else "absent"
        rows.append((repr(text), f"{t_kind} ({t_id})", f"{s_kind} ({s_id})"))
        if (t_id, t_kind) != (s_id, s_kind):
            lines.append(f"special token {text!r}: teacher {t_kind} (id {t_id}) vs student {s_kind} (id {s_id})")
    return rows, lines


def render_chat(tok: Any, conversation: list[dict[str, str]]) -> list[int]:
    """The ids the chat template gives ``conversation`` (rendered to text, then encoded without extra
    special tokens, as the rollout code does)."""
    text = tok.apply_chat_template(conversation, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def compare_chat_templates(teacher_tok: Any, student_tok: Any,
                           conversation: list[dict[str, str]]) -> tuple[str, list[str]]:
    """``(note, mismatch_lines)``: the templates must render the same ids for ``conversation``. Skipped
    (noted, not flagged) when neither tokenizer has a template; flagged when only one has."""
    has = (bool(getattr(teacher_tok, "chat_template", None)), bool(getattr(student_tok, "chat_template", None)))
    if not any(has):
        return "not checked (neither tokenizer has one)", []
    if not all(has):
        side = "teacher" if has[0] else "student"
        return f"only the {side} has one", [f"chat template: only the {side} tokenizer has one"]
    t_ids, s_ids = render_chat(teacher_tok, conversation), render_chat(student_tok, conversation)
    if t_ids == s_ids:
        return f"same ids for the sample conversation ({len(t_ids)} tokens)", []
    i = next((k for k, (a, b) in enumerate(zip(t_ids, s_ids, strict=False)) if a != b), min(len(t_ids), len(s_ids)))
    line = (f"chat template renders different ids ({len(t_ids)} vs {len(s_ids)} tokens); first difference at "
            f"token {i}: teacher {_describe(teacher_tok, t_ids[i:i + 4])} vs student "
            f"{_describe(student_tok, s_ids[i:i + 4])}")
    return "DIFFERS", [line]


def compare_probes(teacher_tok: Any, student_tok: Any,
                   probes: dict[str, str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Each probe string must encode (without added special tokens) to the same ids on both sides."""
    rows, lines = [], []
    for name, text in probes.items():
        t_ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        s_ids = student_tok(text, add_special_tokens=False)["input_ids"]
        t_desc, s_desc = _describe(teacher_tok, t_ids), _describe(student_tok, s_ids)
        rows.append((f"{name} {text!r}", t_desc, s_desc))
        if t_ids != s_ids:
            lines.append(f"probe {name} ({text!r}) splits differently: teacher {t_desc} vs student {s_desc}")
    return rows, lines


def pair_probes(pair: Any, task: Any = None) -> dict[str, str]:
    """name -> string whose split both tokenizers must agree on: the student's and the teacher's end tokens
    (tokenizer EOS and generation-config stop ids), the think delimiters either vocabulary has, and the
    task's response markers (``task.convention``) when it has them."""
    from opd_exp.models.pair import THINK_DELIMITERS, stop_ids_of

    probes: dict[str, str] = {}
    for role, tok, model in (("student", pair.tokenizer, pair.student), ("teacher", pair.teacher_tokenizer,
                                                                         pair.teacher)):
        ends = [tok.eos_token] + [tok.convert_ids_to_tokens(i) for i in stop_ids_of(model) if 0 <= i < len(tok)]
        for i, end in enumerate(dict.fromkeys(e for e in ends if e)):
            probes[f"{role}_end" + (f"_{i}" if i else "")] = end
    vocab = pair.tokenizer.get_vocab().keys() | pair.teacher_tokenizer.get_vocab().keys()
    probes |= {f"think_{'open' if i == 0 else 'close'}": t for i, t in enumerate(THINK_DELIMITERS) if t in vocab}
    c = getattr(task, "convention", None)
    if c is not None:
        probes |= {"think_open": c.think_open, "think_close": c.think_close, "answer_prefix": c.answer_prefix,
                   "end": c.end}
    return probes


def audit_tokenizers(teacher_tok: Any, student_tok: Any, probes: dict[str, str],
                     conversation: list[dict[str, str]] | None = None) -> AuditReport:
    """Compare two Hugging Face tokenizers: vocabulary, special tokens and EOS, chat template (on
    ``conversation``, default :data:`DEFAULT_CONVERSATION`) and the split of each probe string."""
    sizes, n_diff, vocab_lines = compare_vocab(teacher_tok, student_tok)
    special_rows, special_lines = compare_special_tokens(teacher_tok, student_tok)
    note, template_lines = compare_chat_templates(teacher_tok, student_tok, conversation or DEFAULT_CONVERSATION)
    probe_rows, probe_lines = compare_probes(teacher_tok, student_tok, probes)
    return AuditReport(vocab_sizes=sizes, n_vocab_diff=n_diff, shared_vocab=sizes[0] == sizes[1] and n_diff == 0,
                       special_rows=special_rows, probe_rows=probe_rows, template_note=note,
                       mismatches=vocab_lines + special_lines + template_lines + probe_lines)


def check_pair_compatible(report: AuditReport, mapping: str | None) -> None:
    """Stop before training when the teacher cannot read the student's ids.

    Raises ``ValueError`` when the vocabularies differ and ``mapping`` (a vocabulary-mapping strategy) is None:
    the teacher would score each student id as whatever its own vocabulary has at that id. Other mismatches
    (EOS, special tokens, template, probe splits) with a shared vocabulary are logged as a warning and pass:
    they are the failure mode the paper studies, and special-token masking is its fix.
    """
    if not report.shared_vocab and mapping is None:
        raise ValueError(
            f"teacher and student vocabularies differ (sizes {report.vocab_sizes[0]} vs {report.vocab_sizes[1]}, "
            f"{report.n_vocab_diff} entries map to different ids) and no vocabulary mapping is configured: the "
            "teacher would score the student's token ids as its own. Use a teacher that shares the student's "
            "tokenizer (no cross-vocabulary mapping is implemented). Audit:\n" + report.format())
    if report.mismatches:
        log.warning("tokenizer audit found problems (training continues; consider special-token masking):\n%s",
                    report.format())


# --- side-by-side scoring (Fig. 5) ---------------------------------------------------------------------------


class TokenScore(NamedTuple):
    """One token of :func:`score_side_by_side`: its piece and its log-prob under each model."""

    token: str
    teacher_logprob: float
    student_logprob: float


@torch.no_grad()
def sequence_logprobs(model: Any, ids_L: list[int]) -> torch.Tensor:
    """float32 (L-1,): ``log p(ids[t] | ids[:t])`` for t = 1..L-1 under a causal LM (one forward pass)."""
    device = next(model.parameters()).device
    ids_1L = torch.tensor([ids_L], dtype=torch.long, device=device)
    vocab = model.get_output_embeddings().weight.shape[0]
    if int(ids_1L.max()) >= vocab:
        raise ValueError(f"token id {int(ids_1L.max())} is outside the model's vocabulary of {vocab}")
    logits_1LV = model(input_ids=ids_1L).logits.float()
    logprobs_LV = torch.log_softmax(logits_1LV[0, :-1], dim=-1)
    return logprobs_LV.gather(-1, ids_1L[0, 1:].unsqueeze(-1)).squeeze(-1).cpu()


def score_side_by_side(teacher_model: Any, student_model: Any, tokenizer: Any, text: str,
                       prefix: str | None = None) -> list[TokenScore]:
    """Per-token log-probs of ``text`` under both models, in the (shared) ``tokenizer``'s split.

    The context is ``prefix`` when given (encoded without added special tokens, e.g. a chat-rendered prompt),
    else the BOS token when the tokenizer has one; without either, ``text``'s first token has no context and
    is left out. Each token is scored given the context and the text before it (teacher forcing).
    """
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prefix:
        context = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    else:
        context = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids_L = context + text_ids
    if len(ids_L) < 2:
        return []
    teacher_N = sequence_logprobs(teacher_model, ids_L)
    student_N = sequence_logprobs(student_model, ids_L)
    first = max(len(context), 1)  # index into ids_L of the first scored token
    pieces = tokenizer.convert_ids_to_tokens(ids_L[first:])
    return [TokenScore(piece, float(teacher_N[i - 1]), float(student_N[i - 1]))
            for piece, i in zip(pieces, range(first, len(ids_L)), strict=True)]


def format_side_by_side(rows: list[TokenScore], flag_gap: float = 5.0) -> str:
    """A table of :func:`score_side_by_side` rows: token, student and teacher log-prob, and the gap
    (teacher - student); rows with |gap| >= ``flag_gap`` nats are marked ``<--``."""
    width = max([len("token")] + [len(repr(r.token)) for r in rows])
    lines = [f"{'token'.ljust(width)}  {'student':>9}  {'teacher':>9}  {'gap':>9}"]
    for r in rows:
        gap = r.teacher_logprob - r.student_logprob
        mark = "  <--" if abs(gap) >= flag_gap else ""
        lines.append(f"{repr(r.token).ljust(width)}  {r.student_logprob:9.2f}  {r.teacher_logprob:9.2f}  "
                     f"{gap:9.2f}{mark}")
    return "\n".join(lines)
