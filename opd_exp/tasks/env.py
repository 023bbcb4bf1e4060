"""The environment protocol of multi-turn tasks, and its TextWorld, ScienceWorld and ALFWorld adapters.

    ep = task.episode(example)      # an Episode, fresh
    obs = ep.reset()                # the first user turn: goal and trimmed observation
    obs, done = ep.step("take mug from table")   # any text: an invalid action gets the game's own feedback
    ep.won, ep.steps, ep.invalid    # success, actions taken, actions the game rejected

The generated games' observations are trimmed to what an agent needs (room, what lies where, exits, inventory,
the last feedback) so that contexts stay short for the tiny models; ScienceWorld's and ALFWorld's are the
engines' own English (:func:`trim`: for real pairs). Engines are imported lazily, only when an episode of theirs
is made: ``textworld`` (the ``agentic`` extra), ``scienceworld`` (the ``scienceworld`` extra; needs Java),
``alfworld`` (installed by hand, with its data: README).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Protocol

INVALID = "invalid command."  # TextWorld's own feedback ("Invalid command."), as the trimmed text writes it
SCIENCEWORLD_INVALID = "No known action matches that input."
ALFWORLD_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
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


@functools.lru_cache(maxsize=4096)
def loaded_textworld_game(game_file: str, modified_ns: int):
    """``textworld.start`` once per process and game file version (``modified_ns``: its mtime, so a file rewritten
    in place loads again): a reset takes 1.0 ms instead of 2.6 ms (scripts/bench_env.py, a 2-room game: the JSON
    parsed and the Inform7 naming built once, not per episode). Episodes play copies: TextWorld's
    ``TextWorldEnv.copy`` shares the loaded game read-only and each copy's reset builds its own progression, so
    episodes of one game played side by side never share a state."""
    import textworld

    return textworld.start(game_file, textworld.EnvInfos(won=True, lost=True))


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
        self._env = loaded_textworld_game(self.game_file, os.stat(self.game_file).st_mtime_ns).copy()
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


def trim(text: str, max_chars: int) -> str:
    """An engine's text for a real pair's context: tabs and blank lines dropped, at most ``max_chars``."""
    lines = (" ".join(line.split()) for line in text.splitlines())
    text = "\n".join(line for line in lines if line)
    return text if len(text) <= max_chars else text[: max_chars - 3].rstrip() + "..."


@functools.cache
def scienceworld_jvm(pid: int):
    """The ScienceWorld environment whose JVM process ``pid`` uses (a forked child starts its own): started once,
    as ``ScienceWorldEnv`` starts it (2 s; ~0.7 GB with eight simulators), and kept (deleting it stops the JVM)."""
    from scienceworld import ScienceWorldEnv

    return ScienceWorldEnv("")


def scienceworld_simulator():
    """A fresh ScienceWorld simulator (the jar's ``PythonInterface``, the object ``ScienceWorldEnv`` drives) in
    this process's JVM: one per episode, so that a batch of episodes shares one JVM instead of one each."""
    return scienceworld_jvm(os.getpid())._gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()


class ScienceWorldEpisode:
    """A ScienceWorld task variation (arXiv 2203.07540; ``scienceworld`` on PyPI, needs Java). Success = score
    100; a negative score (a failed task) ends the episode, as ``ScienceWorldEnv.step`` ends it.

    It calls the simulator as ``ScienceWorldEnv`` does, minus what an agent here never reads:
    ``ScienceWorldEnv.step`` also lists every valid action at every step (0.25 s a step against 0.02-0.08 s)."""

    def __init__(self, task: str, variation: int, max_chars: int = 1000):
        self.task, self.variation, self.max_chars = task, variation, max_chars
        self.won, self.steps, self.invalid, self._sim = False, 0, 0, None

    def reset(self) -> str:
        """Load the variation; the task description and the look-around."""
        if self._sim is None:  # kept across resets: a replay reloads the same simulator
            self._sim = scienceworld_simulator()
        self._sim.load(self.task, self.variation, "", False)
        self._sim.reset()
        self.won, self.steps, self.invalid = False, 0, 0
        return trim(f"goal: {self._sim.getTaskDescription()}\n{self._sim.freeActionLook()}", self.max_chars)

    def step(self, action: str) -> tuple[str, bool]:
        obs = self._sim.step(" ".join(action.split()))
        self.steps += 1
        self.invalid += obs.strip() == SCIENCEWORLD_INVALID
        score = self._sim.getScore()
        self.won = score >= 1.0
        return trim(obs, self.max_chars), bool(self._sim.getCompleted()) or self.won or score < 0


def start_alfworld_game(game_file: str):
    """ALFWorld's TextWorld game (a ``.tw-pddl`` file: its PDDL domain, problem and grammar) started as
    ``AlfredTWEnv`` starts it: TextWorld's PDDL engine, object ids demangled to names ("apple 1"), unshuffled as
    in ALFWorld's evaluation."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler

    infos = textworld.EnvInfos(won=True, admissible_commands=True)
    return textworld.start(game_file, infos, wrappers=[AlfredDemangler(shuffle=False)])


class AlfworldEpisode:
    """One ALFWorld text game (arXiv 2010.03768). An action outside the game's admissible commands is invalid
    (the game answers "Nothing happens."); ``list_actions`` ends each observation with the admissible commands,
    as verl-agent's prompts list them. Success = won."""

    def __init__(self, game_file: str | Path, max_chars: int = 1000, list_actions: bool = False):
        self.game_file, self.max_chars, self.list_actions = str(game_file), max_chars, list_actions
        self.won, self.steps, self.invalid, self._env, self._admissible = False, 0, 0, None, []

    def _observe(self, state) -> str:
        self._admissible = list(state["admissible_commands"] or [])
        text = state.feedback.replace(ALFWORLD_BANNER, "")
        if self.list_actions:
            text += "\nadmissible actions: " + ", ".join(self._admissible)
        return trim(text, self.max_chars)

    def reset(self) -> str:
        """Start the game; its intro ("You are in the middle of a room ... Your task is to: ...")."""
        self._env = start_alfworld_game(self.game_file)
        self.won, self.steps, self.invalid = False, 0, 0
        return self._observe(self._env.reset())

    def step(self, action: str) -> tuple[str, bool]:
        command = " ".join(action.lower().split())
        self.invalid += command not in self._admissible
        state, _, done = self._env.step(command)
        self.steps += 1
        self.won = bool(state["won"])
        return self._observe(state), bool(done) or self.won
