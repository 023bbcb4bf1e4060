"""``task=alfworld``: ALFWorld's household text games (Shridhar et al. 2021, arXiv 2010.03768), played turn by turn.

    prompt    <user>You are in the middle of a room. Looking quickly around you, you see a cabinet 1, ...
              Your task is to: put a clean lettuce in diningtable.
    response  go to countertop 1<end><user>You arrive at countertop 1. On the countertop 1, you see ...<assistant>...

The games are the user's ALFWorld data (``alfworld-download`` into ``$ALFWORLD_DATA``, or ``task.alfworld_data``),
listed as ALFWorld's ``AlfredTWEnv.collect_game_files`` lists them: the ``traj_data.json`` dirs of
``json_2.1.1/train`` (train), ``valid_seen`` (``eval_in_distribution``) and ``valid_unseen``
(``eval_out_of_distribution``), without movable-receptacle or sliced-object trajectories, of the task types in
``task.env_tasks`` (null = all six), whose ``game.tw-pddl`` is marked solvable. Each split is sorted, shuffled by
``task.data_seed`` (task types mixed) and cut at ``task.n_train_games`` / ``task.n_eval_games``. Episodes are
:class:`~opd_exp.tasks.env.AlfworldEpisode` (TextWorld's PDDL engine with ALFWorld's demangled names); success =
won, graded by replaying the completion's actions.

For real pairs only (``opd-exp model=paper_alfworld task=alfworld``); needs ``pip install alfworld`` (``[full]``
for the THOR side, unused here) and ``alfworld-download``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from opd_exp.config import TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.tasks.env import AlfworldEpisode
from opd_exp.tasks.played import RealPairTask

# ALFWorld's TASK_TYPES (alfworld/agents/environment/alfred_tw_env.py), ids 1-6
TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
# split -> its dir under json_2.1.1 (ALFWorld's base_config.yaml: data_path, eval_id_data_path, eval_ood_data_path)
SPLIT_DIRS = {"train": "train", "eval_in_distribution": "valid_seen", "eval_out_of_distribution": "valid_unseen"}
SETUP = "pip install 'alfworld[full]' (the text games need only pip install alfworld), then alfworld-download"


@dataclass(frozen=True)
class Game:
    """One ALFWorld game file of a split."""

    file: str
    task_type: str
    split: str


def data_dir(cfg: TaskConfig) -> Path:
    """``task.alfworld_data``, else env ``ALFWORLD_DATA``, else ALFWorld's default ~/.cache/alfworld."""
    return Path(cfg.alfworld_data or os.environ.get("ALFWORLD_DATA") or "~/.cache/alfworld").expanduser()


def require_alfworld() -> None:
    """A ConfigError naming the setup commands when ``alfworld`` (or TextWorld's PDDL engine) is missing. Only
    looked up: importing ``alfworld`` creates its data dir."""
    missing = [m for m in ("alfworld", "textworld", "fast_downward") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError("task.name", f"alfworld needs the {', '.join(missing)} package(s): {SETUP}")


def list_games(root: Path, split: str, task_types: list[str]) -> list[Game]:
    """The split's solvable games of ``task_types``, sorted by path (AlfredTWEnv.collect_game_files's filter)."""
    games = []
    for traj in sorted((root / "json_2.1.1" / SPLIT_DIRS[split]).rglob("traj_data.json")):
        game_file = traj.parent / "game.tw-pddl"
        if "movable" in str(traj.parent) or "Sliced" in str(traj.parent) or not game_file.is_file():
            continue
        task_type = json.loads(traj.read_text())["task_type"]
        if task_type in task_types and json.loads(game_file.read_text()).get("solvable"):
            games.append(Game(str(game_file), task_type, split))
    return games


class AlfworldTask(RealPairTask):
    """ALFWorld's splits of games, prompts, episodes and grading (see the module docstring)."""

    name = "alfworld"

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        types = list(cfg.env_tasks or TASK_TYPES)
        if bad := [t for t in types if t not in TASK_TYPES]:
            raise ConfigError("task.env_tasks", f"got {bad}, allowed values for alfworld: {', '.join(TASK_TYPES)}")
        evals = list(cfg.env_eval_splits or list(SPLIT_DIRS)[1:])
        if bad := [s for s in evals if s not in list(SPLIT_DIRS)[1:]]:
            raise ConfigError("task.env_eval_splits", f"got {bad}, allowed values for alfworld: "
                              f"{', '.join(list(SPLIT_DIRS)[1:])}")
        require_alfworld()
        root = data_dir(cfg)
        if not (root / "json_2.1.1" / "train").is_dir():
            raise ConfigError("task.alfworld_data", f"got {str(root)!r} (task.alfworld_data, else env "
                              f"ALFWORLD_DATA, else ~/.cache/alfworld): no json_2.1.1/train there; {SETUP} "
                              "(it downloads into $ALFWORLD_DATA)")
        self.train = self._split(root, "train", types, cfg.n_train_games)
        self.eval_splits = {s: self._split(root, s, types, cfg.n_eval_games) for s in evals}

    def _split(self, root: Path, split: str, types: list[str], limit: int) -> list[Game]:
        games = list_games(root, split, types)
        if not games:
            raise ConfigError("task.alfworld_data", f"{root / 'json_2.1.1' / SPLIT_DIRS[split]}: no solvable game "
                              f"of task types {types}; re-run alfworld-download")
        random.Random(self.cfg.data_seed).shuffle(games)
        return games[:limit]

    def episode(self, example: Game) -> AlfworldEpisode:
        """A fresh episode of the example's game."""
        return AlfworldEpisode(example.file, max_chars=self.cfg.env_max_obs_chars,
                               list_actions=self.cfg.env_list_actions)
