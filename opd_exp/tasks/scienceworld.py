"""``task=scienceworld``: ScienceWorld's science tasks (Wang et al. 2022, arXiv 2203.07540), played turn by turn.

    prompt    <user>goal: Your task is to boil water. ... This room is called the hallway. In it, you see: ...
    response  open door to kitchen<end><user>The door is now open.<assistant>go to kitchen<end>...

An example is a (task name, variation) pair. The train split holds the variations ScienceWorld lists for
training, the ``dev`` and ``test`` splits its dev and test variations (``task.env_eval_splits``), for the task
names of ``task.env_tasks`` (null = all 30). Each split takes the tasks' variations in turn (every task's first,
then every task's second, ...) up to ``task.n_train_games`` / ``task.n_eval_games``. Episodes are
:class:`~opd_exp.tasks.env.ScienceWorldEpisode` (observations cut at ``task.env_max_obs_chars``); an episode
lasts at most ``task.max_turns`` actions. Success = score 100, graded by replaying the completion's actions.

For real pairs only (``opd-exp model=pair_template ... task=scienceworld``); needs the ``scienceworld``
package (``pip install -e ".[scienceworld]"``) and Java on PATH.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from itertools import zip_longest

from opd_exp.config import TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.tasks.env import ScienceWorldEpisode, scienceworld_simulator
from opd_exp.tasks.played import RealPairTask

SPLITS = ("dev", "test")


@dataclass(frozen=True)
class Variation:
    """One ScienceWorld task variation of a split."""

    task: str
    variation: int
    split: str


def task_names() -> list[str]:
    """ScienceWorld's task names (read from the package, no JVM), or a ConfigError naming what to install."""
    try:
        from scienceworld.constants import ID2TASK
    except ImportError:
        raise ConfigError("task.name", "scienceworld needs the scienceworld package: pip install -e "
                          "'.[scienceworld]' (or pip install scienceworld), and Java on PATH") from None
    if shutil.which("java") is None:
        raise ConfigError("task.name", "scienceworld needs Java on PATH (a JRE >= 11, e.g. apt-get install "
                          "default-jre-headless)")
    return list(ID2TASK.values())


def variations(task: str) -> dict[str, list[int]]:
    """ScienceWorld's own split of ``task``'s variations: {"train": [...], "dev": [...], "test": [...]}."""
    sim = scienceworld_simulator()
    sim.load(task, 0, "", False)
    return {"train": list(sim.getVariationsTrain()), "dev": list(sim.getVariationsDev()),
            "test": list(sim.getVariationsTest())}


def interleave(per_task: list[list[Variation]], limit: int) -> list[Variation]:
    """Every task's first variation, then every task's second, ..., at most ``limit``."""
    rows = [v for turn in zip_longest(*per_task) for v in turn if v is not None]
    return rows[:limit]


class ScienceWorldTask(RealPairTask):
    """Splits of ScienceWorld variations, prompts, episodes and grading (see the module docstring)."""

    name = "scienceworld"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        known = task_names()
        names = list(cfg.env_tasks or known)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError("task.env_tasks", f"got {unknown}, allowed values: {', '.join(known)}")
        splits = list(cfg.env_eval_splits or SPLITS)
        if bad := [s for s in splits if s not in SPLITS]:
            raise ConfigError("task.env_eval_splits", f"got {bad}, allowed values for scienceworld: "
                              f"{', '.join(SPLITS)}")
        listed = {name: variations(name) for name in names}

        def split(which: str, limit: int) -> list[Variation]:
            return interleave([[Variation(n, v, which) for v in listed[n][which]] for n in names], limit)

        self.train = split("train", cfg.n_train_games)
        self.eval_splits = {s: split(s, cfg.n_eval_games) for s in splits}

    def episode(self, example: Variation) -> ScienceWorldEpisode:
        """A fresh episode of the example's variation."""
        return ScienceWorldEpisode(example.task, example.variation, max_chars=self.cfg.env_max_obs_chars)
