"""task=scienceworld and task=alfworld: actions read back from any chat template, ScienceWorld played for real
(where Java and the package are: its own splits, a gold path won and graded by replay, invalid actions answered,
episodes independent in one JVM, a multi-turn rollout of a real offline pair), ALFWorld's listing, episode and
grading on a fake of its TextWorld game (the real data needs a download), and the config errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pair_factory import FAMILIES, make_tokenizer, write_pair

from opd_exp.config import ModelConfig, SamplingConfig, TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.rollout.multiturn import turn_ids
from opd_exp.tasks import alfworld as alfworld_mod
from opd_exp.tasks import env as env_mod
from opd_exp.tasks.base import check_task_pair, episode_makers, make_task
from opd_exp.tasks.played import ChatTurns

REPO = Path(__file__).resolve().parent.parent
HAS_SCIENCEWORLD = shutil.which("java") is not None and importlib.util.find_spec("scienceworld") is not None
needs_scienceworld = pytest.mark.skipif(not HAS_SCIENCEWORLD, reason="ScienceWorld needs Java and `scienceworld`")
SW_TASK = "find-non-living-thing"  # gold paths of 5 actions


def completion_text(tok, actions: list[str], observations: list[str], cut_last: bool = False) -> str:
    """The decoded completion play() builds when the model writes ``actions`` (each ending with the stop token,
    but the last when ``cut_last``: cut at max_action_tokens) and the game answers ``observations``; padded."""
    ids = []
    for i, action in enumerate(actions):
        ids += tok(action, add_special_tokens=False)["input_ids"]
        if not (cut_last and i == len(actions) - 1):
            ids.append(tok.eos_token_id)
        if i < len(actions) - 1:
            ids += turn_ids(tok, observations[i])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return tok.decode(ids + [pad] * 3, skip_special_tokens=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_actions_are_read_back_from_any_chat_template(family):
    """Llama 3 headers, ChatML, a plain-text template: every action, an empty one and one cut without its stop
    token, whatever the observations hold."""
    tok = make_tokenizer(family)
    actions = ["open door to kitchen", "", "go to kitchen", "focus on table"]
    observations = ["The door is now open.", "No known action matches that input.", "You move to the kitchen."]
    turns = ChatTurns.of(tok)
    assert turns.actions(completion_text(tok, actions, observations)) == actions
    assert turns.actions(completion_text(tok, actions, observations, cut_last=True)) == actions
    assert turns.actions(completion_text(tok, actions[:1], [])) == actions[:1]


# ------------------------------------------------------------------------------------------------------------
# ScienceWorld, for real


@pytest.fixture(scope="module")
def sw_task():
    """Two training variations of one task, one per eval split."""
    return make_task(TaskConfig(name="scienceworld", env_tasks=[SW_TASK], n_train_games=2, n_eval_games=1,
                                max_turns=8, env_max_obs_chars=600))


@pytest.fixture(scope="module")
def sw_public():
    """ScienceWorld's own public API (its own JVM): the reference the task is checked against."""
    from scienceworld import ScienceWorldEnv

    env = ScienceWorldEnv("")
    yield env
    env.close()


@needs_scienceworld
def test_scienceworld_splits_are_its_own(sw_task, sw_public):
    sw_public.load(SW_TASK, 0)
    expected = {"train": sw_public.get_variations_train()[:2], "dev": sw_public.get_variations_dev()[:1],
                "test": sw_public.get_variations_test()[:1]}
    got = {"train": [v.variation for v in sw_task.train]} | {s: [v.variation for v in exs]
                                                             for s, exs in sw_task.eval_splits.items()}
    assert got == expected and len(set(sum(expected.values(), []))) == 4  # disjoint
    assert {v.task for v in sw_task.train} == {SW_TASK}


@needs_scienceworld
def test_scienceworld_gold_path_wins_and_grade_replays_it(sw_task, sw_public):
    """The gold action sequence ScienceWorld generates for a variation, written by a real pair's template and
    replayed from the decoded text, wins; a completion that does not reach the goal does not."""
    ex = sw_task.train[0]
    sw_public.load(ex.task, ex.variation, generateGoldPath=True)
    gold = sw_public.get_gold_action_sequence()
    ep = sw_task.episode(ex)
    first = ep.reset()
    assert first.startswith("goal: Your task is to find") and "This room is called" in first
    observations = [ep.step(a)[0] for a in gold]
    assert ep.won and ep.steps == len(gold) and ep.invalid == 0
    tok = make_tokenizer("qwen2")
    text = completion_text(tok, gold, observations)
    assert sw_task.prompt_ids(tok, ex) == tok(sw_task.prompt_text(tok, ex), add_special_tokens=False)["input_ids"]
    assert first in sw_task.prompt_text(tok, ex)
    assert sw_task.grade(text, ex)
    assert sw_task.play_stats(text, ex) == {"won": 1.0, "steps": float(len(gold)), "invalid": 0.0}
    assert not sw_task.grade(completion_text(tok, gold[:-1], observations), ex)


@needs_scienceworld
def test_scienceworld_invalid_action_is_answered_and_episodes_are_independent(sw_task):
    a, b = sw_task.episode(sw_task.train[0]), sw_task.episode(sw_task.train[0])
    a.reset(), b.reset()
    obs, done = a.step("dance with the moon")
    assert obs == env_mod.SCIENCEWORLD_INVALID and not done and (a.steps, a.invalid, a.won) == (1, 1, False)
    assert a.step("open door to kitchen") == ("The door is now open.", False) and a.invalid == 1
    assert "door to the kitchen (that is closed)" in b.step("look around")[0]  # b's world is its own


@pytest.mark.slow
@needs_scienceworld
def test_scienceworld_multiturn_rollout_of_a_real_pair(sw_task, tmp_path):
    """A tiny offline Qwen2-style pair (its own BPE tokenizer and ChatML template) plays 2 turns through play():
    ScienceWorld's answer is in the context between the actions, never trained; replaying the decoded completion
    gives the episode play() played."""
    import torch

    from opd_exp.models.pair import load_pair

    dirs = write_pair(tmp_path, "qwen2")
    pair = load_pair(ModelConfig(name="t", kind="pretrained", teacher_path=str(dirs["teacher"]),
                                 student_path=str(dirs["student"]), special_tokens=None), sw_task.cfg)
    tok, examples = pair.tokenizer, sw_task.train[:1]
    prompts = [sw_task.prompt_ids(tok, ex) for ex in examples]
    torch.manual_seed(0)
    ro, episodes = play_two_turns(pair, tok, prompts, episode_makers(sw_task, examples))
    assert all(ep.steps == 2 for ep in episodes)  # random actions: nothing ends the episode early
    for r, ep in enumerate(episodes):
        seen, acts = ro.completion_mask_BT[r], ro.action_mask_BT[r]
        observed = tok.decode(ro.completion_ids_BT[r][seen & ~acts])
        assert "<|im_start|>user" in observed and "<|im_start|>assistant" in observed and acts.any()
        text = tok.decode(ro.completion_ids_BT[r], skip_special_tokens=False)
        assert sw_task.play_stats(text, examples[0]) == {"won": float(ep.won), "steps": float(ep.steps),
                                                           "invalid": float(ep.invalid)}


def play_two_turns(pair, tok, prompts, makers):
    """play() with the hf backend, 2 rollouts, 2 turns of at most 4 tokens."""
    from opd_exp.rollout import make_backend, stop_ids
    from opd_exp.rollout.multiturn import play

    return play(make_backend("hf"), pair.student, tok, prompts, makers, SamplingConfig(rollouts_per_prompt=2),
                stop_ids=stop_ids(pair.student, tok), pad_id=tok.pad_token_id, vocab_size=pair.vocab_size,
                max_turns=2, max_action_tokens=4)


@needs_scienceworld
def test_unknown_scienceworld_task_is_a_config_error():
    with pytest.raises(ConfigError, match=r"task.env_tasks.*'bake-a-cake'.*allowed values: .*boil"):
        make_task(TaskConfig(name="scienceworld", env_tasks=["boil", "bake-a-cake"]))
    with pytest.raises(ConfigError, match=r"task.env_eval_splits.*'valid'.*dev, test"):
        make_task(TaskConfig(name="scienceworld", env_tasks=["boil"], env_eval_splits=["valid"]))


@pytest.mark.parametrize("name", ["scienceworld", "alfworld"])
def test_tiny_pair_is_a_config_error(name):
    with pytest.raises(ConfigError, match=r"model.kind.*'tiny'.*110-id.*model=pair_template"):
        check_task_pair(TaskConfig(name=name), ModelConfig())
    check_task_pair(TaskConfig(name=name), ModelConfig(kind="pretrained", teacher_path="t", student_path="s"))
    check_task_pair(TaskConfig(name="agentic"), ModelConfig())  # the embedded pair's own games


@pytest.mark.slow
def test_cli_refuses_the_tiny_pair_before_any_run_file(tmp_path):
    """`opd-exp task=scienceworld` (the default tiny pair): exit 2, one line naming model.kind, no run dir."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPD_EXP_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "opd_exp", "task=scienceworld", "threads=1",
                          f"hydra.run.dir={run_dir}"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "model.kind" in res.stderr and "model=pair_template" in res.stderr and "Traceback" not in res.stderr
    assert not (run_dir / "run_summary.json").exists() and not (run_dir / "config.yaml").exists()


# ------------------------------------------------------------------------------------------------------------
# ALFWorld: its listing, episode and grading on a fake of its TextWorld game


INTRO = ("-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around you, you "
         "see a countertop 1, and a fridge 1.\n\nYour task is to: put some apple in fridge.")
WIN = ["go to countertop 1", "take apple 1 from countertop 1", "go to fridge 1", "move apple 1 to fridge 1"]


class FakeState(dict):
    """TextWorld's GameState: a dict with the feedback as an attribute."""

    feedback = ""


class FakeAlfredGame:
    """What ``textworld.start`` gives for a ``.tw-pddl`` game with ALFWorld's demangler, for a game won by
    :data:`WIN` in order: PddlEnv's behaviour (a command outside the valid ones: "Nothing happens.", nothing
    changes; done = won)."""

    def __init__(self, game_file: str):
        self.game_file, self.done = game_file, 0

    def _state(self, feedback: str) -> FakeState:
        state = FakeState(won=self.done == len(WIN), admissible_commands=["look", "inventory"] + WIN[self.done:][:1])
        state.feedback = feedback
        return state

    def reset(self) -> FakeState:
        self.done = 0
        return self._state(INTRO)

    def step(self, command: str):
        if self.done < len(WIN) and command.strip() == WIN[self.done]:
            self.done += 1
            state = self._state(f"You did {command}.")
        else:
            state = self._state("Nothing happens.")
        return state, int(state["won"]), state["won"]


def write_game(root: Path, split: str, name: str, task_type: str, solvable: bool = True) -> None:
    trial = root / "json_2.1.1" / split / name / "trial_T0"
    trial.mkdir(parents=True)
    (trial / "traj_data.json").write_text(json.dumps({"task_type": task_type}))
    (trial / "game.tw-pddl").write_text(json.dumps({"pddl_domain": "", "grammar": "", "pddl_problem": "",
                                                    "solvable": solvable}))


@pytest.fixture
def alfworld_data(tmp_path, monkeypatch) -> Path:
    """ALFWorld's layout: 4 solvable train games of two types, and what its listing leaves out (a movable
    receptacle, a sliced object, an unsolvable game); games in each eval split. The package check and the game
    engine are faked."""
    root = tmp_path / "alfworld"
    for i in range(3):
        write_game(root, "train", f"pick_and_place_simple-Apple-None-Fridge-{i}", "pick_and_place_simple")
    write_game(root, "train", "pick_cool_then_place_in_recep-Apple-None-Fridge-9", "pick_cool_then_place_in_recep")
    write_game(root, "train", "pick_and_place_simple-Apple-None-Fridge-movable", "pick_and_place_simple")
    write_game(root, "train", "pick_and_place_simple-AppleSliced-None-Fridge-1", "pick_and_place_simple")
    write_game(root, "train", "pick_and_place_simple-Apple-None-Fridge-7", "pick_and_place_simple", solvable=False)
    write_game(root, "valid_seen", "pick_and_place_simple-Apple-None-Fridge-5", "pick_and_place_simple")
    write_game(root, "valid_unseen", "pick_and_place_simple-Apple-None-Fridge-6", "pick_and_place_simple")
    write_game(root, "valid_unseen", "pick_cool_then_place_in_recep-Apple-None-Fridge-8",
               "pick_cool_then_place_in_recep")
    monkeypatch.setattr(alfworld_mod, "require_alfworld", lambda: None)
    monkeypatch.setattr(env_mod, "start_alfworld_game", FakeAlfredGame)
    return root


def alfworld_cfg(root: Path | None, **kw) -> TaskConfig:
    return TaskConfig(**{"name": "alfworld", "alfworld_data": str(root) if root else None, "n_train_games": 10,
                         "n_eval_games": 10, "max_turns": 6, **kw})


def test_alfworld_splits_follow_alfworlds_listing(alfworld_data, monkeypatch):
    task = make_task(alfworld_cfg(alfworld_data))
    names = sorted(Path(g.file).parent.parent.name for g in task.train)
    assert names == [f"pick_and_place_simple-Apple-None-Fridge-{i}" for i in range(3)] + [
        "pick_cool_then_place_in_recep-Apple-None-Fridge-9"]
    assert sorted(task.eval_splits) == ["eval_in_distribution", "eval_out_of_distribution"]
    assert "Fridge-5" in task.eval_splits["eval_in_distribution"][0].file
    assert len(task.eval_splits["eval_out_of_distribution"]) == 2
    only = make_task(alfworld_cfg(alfworld_data, env_tasks=["pick_cool_then_place_in_recep"], n_eval_games=1,
                                  env_eval_splits=["eval_out_of_distribution"]))
    assert [g.task_type for g in only.train] == ["pick_cool_then_place_in_recep"]
    assert list(only.eval_splits) == ["eval_out_of_distribution"]
    assert "Fridge-8" in only.eval_splits["eval_out_of_distribution"][0].file
    monkeypatch.setenv("ALFWORLD_DATA", str(alfworld_data))  # the data dir from the environment
    assert len(make_task(alfworld_cfg(None, n_train_games=2)).train) == 2


def test_alfworld_episode_answers_invalid_actions_and_grades_by_replay(alfworld_data):
    task = make_task(alfworld_cfg(alfworld_data, env_list_actions=True))
    ex = task.train[0]
    ep = task.episode(ex)
    first = ep.reset()
    assert first.startswith("You are in the middle of a room.") and "Welcome" not in first
    assert first.endswith("admissible actions: look, inventory, go to countertop 1")
    obs, done = ep.step("Dance  with the moon")
    assert obs.startswith("Nothing happens.") and not done and (ep.steps, ep.invalid) == (1, 1)
    observations = []
    for action in WIN:
        obs, done = ep.step(action.upper())  # the case and spacing a model writes are normalised
        observations.append(obs)
    assert done and ep.won and ep.invalid == 1
    tok = make_tokenizer("llama")
    assert first in tok.decode(task.prompt_ids(tok, ex))
    text = completion_text(tok, WIN, observations)
    assert task.grade(text, ex)
    assert task.play_stats(text, ex) == {"won": 1.0, "steps": 4.0, "invalid": 0.0}
    assert not task.grade(completion_text(tok, WIN[:2] + ["go to fridge 2"], observations), ex)


def test_missing_alfworld_data_or_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(alfworld_mod, "require_alfworld", lambda: None)
    with pytest.raises(ConfigError, match=r"task.alfworld_data.*nowhere.*json_2.1.1/train.*alfworld-download"):
        make_task(alfworld_cfg(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"task.env_tasks.*'pick_and_eat'"):
        make_task(alfworld_cfg(tmp_path, env_tasks=["pick_and_eat"]))
    with pytest.raises(ConfigError, match=r"task.env_eval_splits.*'dev'.*eval_in_distribution"):
        make_task(alfworld_cfg(tmp_path, env_eval_splits=["dev"]))
    monkeypatch.undo()
    if importlib.util.find_spec("alfworld") is None:
        with pytest.raises(ConfigError, match=r"task.name.*alfworld.*pip install 'alfworld\[full\]'"):
            make_task(alfworld_cfg(tmp_path))


def test_real_alfworld_game_plays():
    """ALFWorld's own game files, where the package and the data are installed (`alfworld-download`)."""
    alfworld_mod.require_alfworld() if importlib.util.find_spec("alfworld") else pytest.skip("no alfworld package")
    root = alfworld_mod.data_dir(TaskConfig())
    if not (root / "json_2.1.1" / "valid_seen").is_dir():
        pytest.skip(f"no ALFWorld data in {root} (alfworld-download)")
    task = make_task(alfworld_cfg(None, n_train_games=1, n_eval_games=1))
    ep = task.episode(task.eval_splits["eval_in_distribution"][0])
    assert "Your task is to:" in ep.reset()
    obs, done = ep.step("look")
    assert obs and not done and ep.invalid == 0
    assert ep.step("dance with the moon")[0].startswith("Nothing happens.") and ep.invalid == 1
