"""The task mix (``task=math_agentic``): one student distilled on math and the text games, batches alternating
between the tasks as in arXiv 2603.25562's multi-task setting (Table 2), each task's rows scored by its own
teacher (``model.teachers``).

    task.for_step(step) -> (subtask, k)   # the step's task and how many of its batches came before
    task.eval_splits                      # "<task>/<split>" -> that task's examples (tagged)

Schedule: ``task.mix`` gives integer batches per task in each round (``{math: 1, agentic: 1}`` alternates;
``{math: 2, agentic: 1}`` gives math, agentic, math, ...); a round is spread by smooth weighted round-robin,
so the tasks interleave as evenly as the weights allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opd_exp.config import TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.tasks.agentic import AgenticTask
from opd_exp.tasks.math import MathTask

SUBTASKS = {"math": MathTask, "agentic": AgenticTask}


@dataclass
class Tagged:
    """An example of the subtask ``task``."""

    task: str
    example: Any


def schedule(weights: dict[str, int]) -> list[str]:
    """One round of the batch schedule: each task ``weights[task]`` times, interleaved by smooth weighted
    round-robin (each turn every task gains its weight; the richest goes and pays the round's total)."""
    for name, w in weights.items():
        if name not in SUBTASKS:
            raise ConfigError(f"task.mix.{name}", f"unknown task; allowed values: {', '.join(SUBTASKS)}")
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"task.mix.{name}", f"got {w!r}, expected an integer >= 0 (batches per round)")
    total = sum(weights.values())
    if total == 0:
        raise ConfigError("task.mix", f"got {weights}, at least one task needs a weight > 0")
    credit, out = dict.fromkeys(weights, 0), []
    for _ in range(total):
        for name in weights:
            credit[name] += weights[name]
        pick = max(weights, key=lambda n: credit[n])
        credit[pick] -= total
        out.append(pick)
    return out


class MixTask:
    """The subtasks with positive weight, their schedule, and their eval splits under ``<task>/<split>``."""

    name = "math_agentic"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.round = schedule(dict(cfg.mix))
        self.tasks = {name: SUBTASKS[name](cfg) for name in dict.fromkeys(self.round)}
        self.train = [Tagged(name, ex) for name, task in self.tasks.items() for ex in task.train]
        self.eval_splits = {f"{name}/{split}": [Tagged(name, ex) for ex in examples]
                            for name, task in self.tasks.items() for split, examples in task.eval_splits.items()}

    def for_step(self, step: int):
        """(the subtask of ``step``, how many batches of that subtask came before it)."""
        name = self.round[step % len(self.round)]
        k = (step // len(self.round)) * self.round.count(name) + self.round[: step % len(self.round)].count(name)
        return self.tasks[name], k

    def prompt_ids(self, tokenizer, example: Tagged) -> list[int]:
        return self.tasks[example.task].prompt_ids(tokenizer, example.example)

    def grade(self, completion_text: str, example: Tagged) -> bool:
        return self.tasks[example.task].grade(completion_text, example.example)

    def episode(self, example: Tagged):
        return self.tasks[example.task].episode(example.example)

    def play_stats(self, completion_text: str, example: Tagged) -> dict[str, float] | None:
        task = self.tasks[example.task]
        return task.play_stats(completion_text, example.example) if hasattr(task, "play_stats") else None
