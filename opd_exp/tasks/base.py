"""The Task protocol and registry: what the loop, the evaluation and the bootstrap ask of a task.

    task = make_task(cfg.task)                  # TASKS[cfg.task.name](cfg.task)
    ids = task.prompt_ids(tokenizer, task.train[i])    # rendered with the pair's own chat template
    ok = task.grade(response_text, example)            # lenient: the answer, wherever the response stopped

Nothing in the loop names a concrete task. A single-turn task answers ``episode(example)`` with None; a
multi-turn task returns an environment episode that the rollout backend plays, appending the environment's
observation tokens to the context (in the attention mask, out of the loss mask: Rollout.action_mask_BT).
The evaluation reports a strict accuracy beside :meth:`Task.grade`'s lenient one: a response that never wrote
its end token is wrong, whatever it contains.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Protocol

from opd_exp.config import ModelConfig, TaskConfig
from opd_exp.config.validation import ConfigError


class Task(Protocol):
    """Prompts, splits and a grader (see the module docstring)."""

    name: str
    train: Sequence[Any]  # training examples (prompts)
    eval_splits: dict[str, list[Any]]  # split name -> held-out examples

    def prompt_ids(self, tokenizer, example: Any) -> list[int]:
        """Token ids of the example's prompt rendered with ``tokenizer``'s chat template, ending with the
        assistant's generation prompt."""

    def grade(self, response_text: str, example: Any) -> bool:
        """True when the response answers the example correctly (lenient: ignores whether it ended)."""

    def episode(self, example: Any) -> Any | None:
        """A multi-turn environment episode for ``example``, or None for a single-turn task."""


def task_registry() -> dict[str, type]:
    """name -> Task class (imported here, so that importing the protocol stays cheap)."""
    from opd_exp.tasks.agentic import AgenticTask
    from opd_exp.tasks.alfworld import AlfworldTask
    from opd_exp.tasks.benchmark import BenchmarkTask
    from opd_exp.tasks.champ import ChampTask
    from opd_exp.tasks.math import MathTask
    from opd_exp.tasks.mix import MixTask
    from opd_exp.tasks.scienceworld import ScienceWorldTask

    return {"math": MathTask, "benchmark": BenchmarkTask, "champ": ChampTask, "agentic": AgenticTask,
            "math_agentic": MixTask, "scienceworld": ScienceWorldTask, "alfworld": AlfworldTask}


def check_task_pair(task_cfg: TaskConfig, model_cfg: ModelConfig) -> None:
    """A task for real pairs (``needs_real_pair``: an engine's English, which the embedded pair's 110-id
    tokenizer cannot hold) with the tiny pair: a ConfigError before anything is built or loaded."""
    task = task_registry().get(task_cfg.name)
    if model_cfg.kind == "tiny" and getattr(task, "needs_real_pair", False):
        raise ConfigError("model.kind", f"got 'tiny' with task={task_cfg.name}: the embedded pair's 110-id "
                          f"tokenizer cannot hold {task_cfg.name}'s text; pick a real pair: model=pair_template "
                          "model.teacher_path=<teacher> model.student_path=<student> (or a conf/model/ file with "
                          "kind: pretrained, e.g. model=paper_alfworld)")


_BUILT: dict[str, Task] = {}  # the last task built, by its config: the start-up check and the run share it


def step_task(task: Task, step: int) -> tuple[Task, int]:
    """The task whose prompts step ``step`` trains on and the index of that batch within it: a mix answers
    its schedule (``for_step``), any other task is its own at every step."""
    return task.for_step(step) if hasattr(task, "for_step") else (task, step)


def episode_makers(task: Task, examples: list) -> list | None:
    """Per example a callable making a fresh episode, or None when the task is single-turn."""
    if not examples or task.episode(examples[0]) is None:
        return None
    return [lambda ex=ex: task.episode(ex) for ex in examples]


def make_task(cfg: TaskConfig) -> Task:
    """The task ``cfg.name`` names, or a ConfigError listing the registered ones. Building it reads its data,
    so a dataset error is a ConfigError naming the field and the file; the entrypoint calls this before it
    writes any run file (exit 2), and the run gets the same object back."""
    registry = task_registry()
    if cfg.name not in registry:
        raise ConfigError("task.name", f"got {cfg.name!r}, allowed values: {', '.join(sorted(registry))}")
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = registry[cfg.name](cfg)
    return _BUILT[key]
