"""The environment protocol of multi-turn tasks, and its TextWorld and ScienceWorld adapters.

    ep = task.episode(example)      # an Episode, fresh
    obs = ep.reset()                # the first user turn: goal and trimmed observation
    obs, done = ep.step("take mug from table")   # any text: an invalid action gets the game's own feedback
    ep.won, ep.steps, ep.invalid    # success, actions taken, actions the game rejected

Observations are trimmed to what an agent needs (room, what lies where, exits, inventory, the last feedback)
so that contexts stay short for the tiny models. Engines are imported lazily: ``textworld`` (the
``agentic`` extra) and ``scienceworld`` (needs Java) only when an episode of theirs is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

INVALID = "invalid command."  # TextWorld's own feedback ("Invalid command."), as the trimmed text writes it
DIRECTIONS = ("north", "south", "east", "west")


class Episode(Protocol):
    """One play of one game (see the module docstring)."""

    won: bool
    steps: int  # actions taken
    invalid: int  # actions the game rejected

    def reset(self) -> str:
        """Start the game; the first observation (goal included)."""

    def step(self, action: str) -> tuple[str, bool]:
        """Play ``action``: (the next observation, whether the game is over)."""


def describe(facts, names: dict[str, str]) -> str:
    """The trimmed observation of a TextWorld state's facts (``Proposition`` s over variable ids)::

        kitchen. table: mug, apple. box: closed. exits: east. carrying: nothing.

    ``names``: variable id -> display name. Containers show their contents when open.
    """
    args = [(f.name, [a.name for a in f.arguments]) for f in facts]
    room = next(a[1] for n, a in args if n == "at" and a[0] == "P")
    recs = [a[0] for n, a in args if n == "at" and a[1] == room and a[0] != "P"]
    closed = {a[0] for n, a in args if n in ("closed", "locked")}
    held = {}
    for n, a in args:
        if n in ("on", "in") and a[1] != "I":
            held.setdefault(a[1], []).append(names[a[0]])
    parts = [names[room]]
    for r in sorted(recs, key=lambda v: names[v]):
        inside = "closed" if r in closed else ", ".join(sorted(held.get(r, []))) or "empty"
        parts.append(f"{names[r]}: {inside}")
    exits = sorted(n.split("_")[0] for n, a in args if n.endswith("_of") and n.split("_")[0] in DIRECTIONS
                   and a[1] == room)
    carrying = sorted(names[a[0]] for n, a in args if n == "in" and a[1] == "I")
    parts += [f"exits: {', '.join(exits) or 'none'}", f"carrying: {', '.join(carrying) or 'nothing'}"]
    return ". ".join(parts) + "."


class TextWorldEpisode:
    """A TextWorld JSON game played by TextWorld's Python engine (``textworld.start``, ``tw`` backend)."""

    def __init__(self, game_file: str | Path, goal: str):
        self.game_file, self.goal = str(game_file), goal
        self.won, self.steps, self.invalid, self._env = False, 0, 0, None

    def _observe(self, state) -> str:
        game = state["game"]
        names = {k: (v.name or k) for k, v in game.infos.items()}
        return describe(state["_facts"], {k: v.lower() for k, v in names.items()})

    def reset(self) -> str:
        import textworld

        self._env = textworld.start(self.game_file, textworld.EnvInfos(won=True, lost=True))
        state = self._env.reset()
        self.won, self.steps, self.invalid = False, 0, 0
        return f"{self.goal} {self._observe(state)}"

    def step(self, action: str) -> tuple[str, bool]:
        state, _, done = self._env.step(" ".join(action.lower().split()))
        self.steps += 1
        rejected = state.feedback.strip().lower() == INVALID
        self.invalid += rejected
        self.won = bool(state["won"])
        if self.won:
            return "you won.", True
        if state["lost"]:
            return "you lost.", True
        return (f"{INVALID} " if rejected else "") + self._observe(state), bool(done)


class ScienceWorldEpisode:
    """A ScienceWorld task variation (arXiv 2203.07540; ``scienceworld`` on PyPI, needs Java), its
    observation trimmed to the look-around's first ``max_chars`` characters. Success = score 100."""

    def __init__(self, task: str, variation: int, max_chars: int = 400):
        self.task, self.variation, self.max_chars = task, variation, max_chars
        self.won, self.steps, self.invalid, self._env = False, 0, 0, None

    def reset(self) -> str:
        from scienceworld import ScienceWorldEnv

        self._env = ScienceWorldEnv("", envStepLimit=100)
        self._env.load(self.task, self.variation)
        obs, info = self._env.reset()
        self.won, self.steps, self.invalid = False, 0, 0
        return f"goal: {self._env.get_task_description()} {self._trim(info['look'])}"

    def _trim(self, text: str) -> str:
        return " ".join(text.split())[: self.max_chars]

    def step(self, action: str) -> tuple[str, bool]:
        obs, _, done, info = self._env.step(" ".join(action.split()))
        self.steps += 1
        self.invalid += "no known action" in obs.lower()
        self.won = info.get("score", 0) >= 100
        return self._trim(obs), bool(done) or self.won
