"""The agentic task: household text games (opd_exp/tasks/games.py) played turn by turn (arXiv 2603.25562's
ALFWorld setting, on TextWorld offline).

    prompt    <|bos|><|user|>goal: eat egg. kitchen. shelf: egg. exits: east. carrying: nothing.<|assistant|>
    response  take egg from shelf<|im_end|><|user|>kitchen. shelf: empty. ...<|assistant|>eat egg<|im_end|>
                                   ^ observation tokens: seen, not trained

Train games use ``task.game_rooms`` rooms; each eval split overrides the game knobs (``hard``: one more room,
so longer walks). Splits are seeded by ``task.data_seed`` and disjoint by seed. Success = the game is won;
:meth:`AgenticTask.grade` replays the actions a completion wrote in a fresh episode, so a decoded text is
graded exactly as it was played; :meth:`AgenticTask.play_stats` adds the steps taken and the invalid actions.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from opd_exp.config import TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.models.tokenization import ASSISTANT, DEFAULT_CONVENTION, PAD, USER
from opd_exp.tasks.env import INVALID, TextWorldEpisode
from opd_exp.tasks.games import TEXT_WORDS, GameKnobs, ensure_games
from opd_exp.tasks.played import PlayedTask

GAME_KNOBS = ("rooms", "receptacles", "distractors")
SPLIT_OFFSET = 50_000  # eval split j's seeds start at data_seed * 1e6 + (j + 1) * SPLIT_OFFSET


@dataclass
class GameExample:
    """One game: its file, goal, first observation (the prompt), the expert's turns (action, observation)."""

    file: str
    goal: str
    first_observation: str
    walkthrough: list[str]
    turns: list[list[str]]
    split: str


def game_knobs(cfg: TaskConfig, name: str, overrides: dict) -> GameKnobs:
    """The train knobs (``task.game_*``) with one eval split's overrides applied."""
    knobs = {"rooms": cfg.game_rooms, "receptacles": cfg.game_receptacles, "distractors": cfg.game_distractors}
    for key, value in (overrides or {}).items():
        if key not in GAME_KNOBS:
            raise ConfigError(f"task.game_eval_splits.{name}.{key}", f"unknown key; valid keys: "
                              f"{', '.join(GAME_KNOBS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key != "distractors" else 0):
            raise ConfigError(f"task.game_eval_splits.{name}.{key}", f"got {value!r}, expected a positive integer")
        knobs[key] = value
    return GameKnobs(**knobs)


def games_dir(cfg: TaskConfig) -> Path:
    """``task.games_dir``, else the model cache (``OPD_EXP_CACHE``, else ~/.cache/opd_exp)."""
    return Path(cfg.games_dir or os.environ.get("OPD_EXP_CACHE") or "~/.cache/opd_exp").expanduser()


class AgenticTask(PlayedTask):
    """Train pool and eval splits of games, prompts, episodes and grading (see the module docstring)."""

    name = "agentic"
    convention = DEFAULT_CONVENTION

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        base = cfg.data_seed * 1_000_000
        self.eval_splits = {}
        for j, split in enumerate(sorted(cfg.game_eval_splits or {"id": {}})):
            seeds = list(range(base + (j + 1) * SPLIT_OFFSET, base + (j + 1) * SPLIT_OFFSET + cfg.n_eval_games))
            self.eval_splits[split] = self._load(game_knobs(cfg, split, cfg.game_eval_splits.get(split)), seeds,
                                                 split)
        self.train = self._load(game_knobs(cfg, "train", {}), list(range(base, base + cfg.n_train_games)), "train")

    def _load(self, knobs: GameKnobs, seeds: list[int], split: str) -> list[GameExample]:
        entry, records = ensure_games(games_dir(self.cfg), knobs, seeds, workers=self.cfg.game_workers)
        return [GameExample(file=str(entry / r["file"]), goal=r["goal"], first_observation=r["first_observation"],
                            walkthrough=r["walkthrough"], turns=r["turns"], split=split) for r in records]

    # --------------------------------------------------------------------------------------------------------
    def first_observation(self, example: GameExample) -> str:
        """The goal and first observation (the prompt's user turn, :meth:`PlayedTask.prompt_text`)."""
        return example.first_observation

    def episode(self, example: GameExample) -> TextWorldEpisode:
        """A fresh episode of the example's game."""
        return TextWorldEpisode(example.file, example.goal)

    def target_turns(self, example: GameExample) -> list[tuple[str, str | None]]:
        """The expert's (action + end token, next observation or None after the last action) for at most
        ``task.max_turns`` actions, as :func:`~opd_exp.rollout.multiturn.play` would feed them: the SFT data."""
        turns = [(f"{action}{self.convention.end}", obs) for action, obs in example.turns[: self.cfg.max_turns]]
        return turns[:-1] + [(turns[-1][0], None)]

    def detour_turns(self, example: GameExample, bad_action: str, at: int) -> list[tuple[str, str | None, bool]]:
        """The expert's turns with ``bad_action``, an action the game rejects, played before expert turn ``at``:
        (action + end token, next observation or None after the last action, trained). The rejected action and
        the game's reply (``invalid command.`` and the unchanged observation, as :class:`TextWorldEpisode`
        writes it) are in the context and out of the loss; at most ``task.max_turns`` actions in all."""
        end = self.convention.end
        before = (example.turns[at - 1][1] if at else
                  example.first_observation.removeprefix(example.goal).strip())
        turns = [(f"{action}{end}", obs, True) for action, obs in example.turns]
        turns.insert(at, (f"{bad_action}{end}", f"{INVALID} {before}", False))
        turns = turns[: self.cfg.max_turns]
        return turns[:-1] + [(turns[-1][0], None, turns[-1][2])]

    def detours(self, examples: list[GameExample], per_game: int, seed: int
                ) -> list[tuple[GameExample, list[tuple[str, str | None, bool]]]]:
        """``per_game`` detoured copies of each game's expert turns (:meth:`detour_turns`), each with one
        action the game rejects before a uniformly drawn expert turn (never after the last one kept): another
        game's expert action that names something this game does not hold, the commonest error of a policy that
        memorised other games. Seeded by ``seed``. The SFT data of ``model.bootstrap.<member>.sft_detours``:
        demonstrations that show how to go on after an error (DART's noise injected into the demonstrator,
        arXiv 1703.09327; DAgger's states of the learner, arXiv 1011.0686), so that a teacher scores the
        student's contexts, not only the expert's."""
        rng = random.Random(seed)
        pool = sorted({a for ex in examples for a in ex.walkthrough if not a.startswith("go ")})
        out = []
        for ex in examples:
            names = game_names(ex.file)
            foreign = [a for a in pool if any(w not in names and w not in TEXT_WORDS for w in a.split())]
            kept = min(len(ex.turns), self.cfg.max_turns - 1)
            for _ in range(per_game if foreign and kept else 0):
                out.append((ex, self.detour_turns(ex, rng.choice(foreign), rng.randrange(kept))))
        return out

    @staticmethod
    def actions(completion_text: str, end: str = DEFAULT_CONVENTION.end) -> list[str]:
        """The actions a decoded completion wrote: the text before each end token or observation turn."""
        text = completion_text.replace(PAD, "")
        pieces = text.split(USER)
        out = [pieces[0]] + [p.split(ASSISTANT, 1)[1] for p in pieces[1:] if ASSISTANT in p]
        return [re.sub(re.escape(end) + ".*", "", p, flags=re.S).strip() for p in out if p.strip()]

    def completion_actions(self, completion_text: str) -> list[str]:
        """The actions :meth:`PlayedTask.replay` plays: :meth:`actions` with this task's end token."""
        return self.actions(completion_text, self.convention.end)


def game_names(game_file: str) -> set[str]:
    """Every word of every entity name in a TextWorld JSON game (rooms, receptacles, objects): an action naming
    any other word (besides the commands' own words) is one the game must reject."""
    infos = json.loads(Path(game_file).read_text())["infos"]
    return {w for _, info in infos for w in (info.get("name") or "").lower().split()}
