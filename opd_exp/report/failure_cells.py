"""The failure-mode report's inputs: runs grouped into cells (pair x estimator x mask), each run's raw
per-token samples (diag/samples_step*.npz) and metrics, the pair's tokenizer, and seed-level statistics."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from opd_exp import rundir
from opd_exp.report.runs import Run
from opd_exp.report.stats import Stat, mean_ci

LOG_FLOOR = float(np.log(np.finfo(np.float32).tiny))  # probabilities are stored as float32: log floor -87.3


# ----------------------------------------------------------------------------- runs as cells


@dataclass(frozen=True)
class Cell:
    """What a run varies, read from its resolved config (recipe names are not needed)."""

    pair: str
    estimator: str
    top_p: float
    mask: bool

    @property
    def label(self) -> str:
        return f"{self.estimator}, p={self.top_p:g}" + (", +mask" if self.mask else "")

    @property
    def is_baseline(self) -> bool:
        return self.estimator == "sampled_token" and self.top_p >= 1.0 and not self.mask

    @property
    def is_fix(self) -> bool:
        return self.estimator == "topk_rkl" and self.top_p < 1.0 and self.mask


def cell_of(run: Run) -> Cell:
    return Cell(str(run.lookup("model.name")), str(run.lookup("estimator.name")),
                float(run.lookup("sampling.top_p") or 1.0), bool(run.lookup("mask.enabled")))


def by_cell(runs: list[Run]) -> dict[Cell, list[Run]]:
    cells: dict[Cell, list[Run]] = defaultdict(list)
    for run in runs:
        cells[cell_of(run)].append(run)
    return dict(sorted(cells.items(), key=lambda kv: (kv[0].pair, kv[0].estimator, kv[0].top_p, kv[0].mask)))


def samples(run: Run, which: str) -> dict[str, np.ndarray] | None:
    """The raw per-token samples of the first (``which="first"``) or last saved step, or None."""
    return _samples(run.path, which)


@lru_cache(maxsize=512)
def _samples(path: Path, which: str) -> dict[str, np.ndarray] | None:
    files = sorted((path / "diag").glob("samples_step*.npz"),
                   key=lambda p: int(p.stem.removeprefix("samples_step")))
    if not files:
        return None
    with np.load(files[0] if which == "first" else files[-1]) as data:
        return {k: data[k] for k in data.files}


def log_probs(s: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(log q(y_t), log pi(y_t)) per token, float64; stored float32 probabilities floor at :data:`LOG_FLOOR`."""
    def one(name: str) -> np.ndarray:
        if f"{name}_logprob" in s:
            return s[f"{name}_logprob"].astype(np.float64)
        return np.log(np.maximum(s[f"{name}_prob"].astype(np.float64), np.finfo(np.float32).tiny))
    return one("teacher"), one("student")


def pair_tokenizer(run: Run):
    """The run's (student) tokenizer without loading any model: the in-repo one for tiny pairs."""
    if run.lookup("model.kind") == "tiny":
        from opd_exp.models.tokenization import build_tokenizer

        return build_tokenizer()
    try:
        from opd_exp.models.pair import load_tokenizer

        return load_tokenizer(run.lookup("model.tokenizer_path") or run.lookup("model.student_path"))
    except Exception:  # a report must not need the checkpoints; ids are shown as numbers then
        return None


def special_token_ids(run: Run, tok) -> dict[str, int]:
    """The pair's masking defaults (``model.special_tokens``) as {token string: id}."""
    names = run.lookup("model.special_tokens") or []
    vocab = tok.get_vocab() if tok is not None else {}
    return {str(t): (t if isinstance(t, int) else vocab[t]) for t in names if isinstance(t, int) or t in vocab}


def all_special_ids(tok, s: dict[str, np.ndarray]) -> np.ndarray:
    """Ids treated as special when special tokens are left out (mode 2): the tokenizer's, else is_special."""
    if tok is not None:
        return np.asarray(tok.all_special_ids)
    return np.unique(s["token_id"][s["is_special"]])


def seed_stat(per_run: dict[Any, float]) -> Stat:
    return mean_ci([v for v in per_run.values() if v is not None and math.isfinite(v)])


def paired(a: dict[Any, float], b: dict[Any, float]) -> Stat:
    """Mean and CI of a - b over the seeds both have."""
    return mean_ci([a[s] - b[s] for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])])


def fmt(s: Stat, digits: int = 3) -> str:
    if s.n == 0:
        return "n/a"
    if s.n == 1:
        return f"{s.mean:.{digits}f} (n=1, no CI)"
    return f"{s.mean:.{digits}f} [{s.lo:.{digits}f}, {s.hi:.{digits}f}] (n={s.n})"


@lru_cache(maxsize=512)
def _metrics(path: Path) -> tuple[dict, ...]:
    return tuple(rundir.read_metrics(path))


def metric_at(run: Run, key: str, first: bool = False) -> float | None:
    """``key`` at the first (or last) step that logged it, or None."""
    rows = [r for r in _metrics(run.path) if r.get(key) is not None]
    return None if not rows else float(rows[0 if first else -1][key])


def clear_caches() -> None:
    """Forget cached samples and metrics: run dirs may have grown since an earlier report in this process."""
    _samples.cache_clear()
    _metrics.cache_clear()


def find_loop(cells: dict[Cell, list[Run]], max_period: int = 8, min_repeats: int = 3):
    """The first saved response with a repetition loop (baseline cells first, last step before first):
    (cell, seed, step, token ids, teacher probs, student probs, loop mask), or None. Only responses kept
    whole by the samples' subsampling are searched."""
    from opd_exp.train.diagnostics import repeat_loop_mask

    order = sorted(cells.items(), key=lambda kv: not kv[0].is_baseline)
    for which in ("last", "first"):
        for cell, runs in order:
            for run in runs:
                s = samples(run, which)
                if s is None or "teacher_prob" not in s:
                    continue
                for row in np.unique(s["row"]):
                    idx = np.flatnonzero(s["row"] == row)
                    idx = idx[np.argsort(s["abs_pos"][idx])]
                    if not np.array_equal(s["abs_pos"][idx], np.arange(len(idx))):
                        continue  # a subsampled response: gaps would fake or hide loops
                    loop = repeat_loop_mask(s["token_id"][idx].astype(np.int64), max_period, min_repeats)
                    if loop.any():
                        return (cell, run.seed, which, s["token_id"][idx], s["teacher_prob"][idx],
                                s["student_prob"][idx], loop)
    return None
