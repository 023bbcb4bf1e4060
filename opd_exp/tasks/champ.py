"""``task=champ``: the CHAMP competition-math benchmark (Mao et al. 2024, arXiv 2401.06961), offline.

The ``champ-dataset`` package ships its 270 problems (five categories: number theory, polynomials, sequences,
inequalities, combinatorics) with final answers inside the wheel, so this task needs no download. Problems are
shuffled by ``task.data_seed``; the first ``task.n_eval`` form the ``champ`` eval split, the next ``task.n_train``
the training prompts (disjoint). Prompts, rendering and grading are :class:`BenchmarkTask`'s (the paper's
``\\boxed{}`` template, math-verify). Some reference answers are prose ("It is not possible"): those are matched
exactly after normalisation, math-verify reads the others.
"""

from __future__ import annotations

import random
from functools import lru_cache

from opd_exp.config import TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.tasks.benchmark import BenchmarkTask, Problem, check_grader, check_prompt_template

CHAMP_VERSION = "v0"  # the dataset file inside the package


@lru_cache(maxsize=1)
def load_champ() -> tuple[Problem, ...]:
    """The 270 CHAMP problems in the package's order (``champ_dataset.load``, read once per process); a
    ConfigError naming the extra to install when the package is missing."""
    try:
        import champ_dataset
    except ImportError:
        raise ConfigError("task.name", "champ needs the champ-dataset package: pip install 'opd-exp[real]'") from None
    problems = champ_dataset.load(CHAMP_VERSION).problems
    return tuple(Problem(question=p.text.strip(), answer=p.answer.strip(), split="champ") for p in problems.values())


class ChampTask(BenchmarkTask):
    """CHAMP as a :class:`BenchmarkTask` whose rows come from the package instead of ``datasets``."""

    name = "champ"

    def __init__(self, cfg: TaskConfig):  # not super().__init__: that would load task.train_data
        self.cfg = cfg
        check_grader(self.name)
        check_prompt_template(cfg.prompt_template)
        rows = list(load_champ())
        if cfg.n_eval >= len(rows):
            raise ConfigError("task.n_eval", f"got {cfg.n_eval}, allowed: < {len(rows)} (CHAMP's problems; the "
                              "rest are the training prompts)")
        random.Random(cfg.data_seed).shuffle(rows)
        self.eval_splits = {"champ": rows[:cfg.n_eval]}
        self.train = [Problem(p.question, p.answer, "train") for p in rows[cfg.n_eval:][:cfg.n_train]]
        self.eval_k = {}
