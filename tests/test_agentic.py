"""The agentic task: TextWorld games won by their walkthroughs, invalid actions answered, the vocabulary covering
every game text, multi-turn rollouts whose observation tokens are seen and never trained (exactly zero gradient
for every estimator), grading by replay, the mix's schedule and the per-task teacher."""

import dataclasses
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd_exp.config import RunConfig, SamplingConfig, TaskConfig
from opd_exp.models.bootstrap import sft_rows
from opd_exp.models.forward import response_head
from opd_exp.models.pair import ModelPair
from opd_exp.models.tokenization import build_tokenizer, unknown_pieces, warn_unknown
from opd_exp.objectives import ESTIMATORS
from opd_exp.rollout import make_backend
from opd_exp.rollout.base import Rollout, left_pad
from opd_exp.rollout.multiturn import play, turn_ids
from opd_exp.tasks.base import episode_makers, make_task, step_task
from opd_exp.tasks.env import INVALID, TextWorldEpisode
from opd_exp.tasks.games import GameKnobs, design
from opd_exp.tasks.mix import schedule
from opd_exp.train.collect import collect

pytest.importorskip("textworld")

TOK = build_tokenizer()
V = len(TOK)


def tiny_llama(seed: int, width: int = 16) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=512, tie_word_embeddings=True,
                                        bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id,
                                        pad_token_id=TOK.pad_token_id))


@pytest.fixture(scope="module")
def task_cfg(tmp_path_factory) -> TaskConfig:
    """3 training games (2 rooms), 1 per eval split (``id``; ``hard``: 3 rooms), in a temp cache."""
    return TaskConfig(name="agentic", n_train_games=3, n_eval_games=1, games_dir=str(tmp_path_factory.mktemp("g")),
                      game_workers=1, n_train=16, n_eval=2, eval_splits={"id": {}}, max_turns=3,
                      max_action_tokens=6)


@pytest.fixture(scope="module")
def task(task_cfg):
    return make_task(task_cfg)


def all_games(task):
    return task.train + [ex for split in task.eval_splits.values() for ex in split]


def test_every_game_is_won_by_its_walkthrough(task):
    """Replayed from the saved file in a fresh episode (not the generator's own check)."""
    assert len(task.train) == 3 and sorted(task.eval_splits) == ["hard", "id"]
    for ex in all_games(task):
        ep = TextWorldEpisode(ex.file, ex.goal)
        assert ep.reset() == ex.first_observation
        for i, action in enumerate(ex.walkthrough):
            _, done = ep.step(action)
            assert done == (i == len(ex.walkthrough) - 1)
        assert ep.won and ep.invalid == 0


def test_episodes_of_one_game_side_by_side_keep_their_own_state(task):
    """Episodes share the game loaded once per process (env.loaded_textworld_game) but not its progression:
    one walks the walkthrough while another, interleaved with it, stays put; each sees what an engine of its
    own (a fresh textworld.start) sees, and a second reset starts over."""
    import textworld

    ex = task.train[0]
    walker, idler = TextWorldEpisode(ex.file, ex.goal), TextWorldEpisode(ex.file, ex.goal)
    own = textworld.start(ex.file, textworld.EnvInfos(won=True, lost=True))
    own.reset()
    assert walker.reset() == idler.reset() == ex.first_observation
    for action in ex.walkthrough:
        obs, _ = walker.step(action)
        state, _, _ = own.step(action)
        assert obs == ("you won." if state["won"] else walker._observe(state))
        _, idle_done = idler.step("look")
        assert not idle_done and not idler.won
    assert walker.won and not idler.won
    assert walker.reset() == ex.first_observation and not walker.won


def test_hard_split_has_one_more_room():
    easy, hard = design(5, GameKnobs(rooms=2)), design(5, GameKnobs(rooms=3))
    assert len(easy.rooms) == 2 and len(hard.rooms) == 3


def test_expert_acts_on_what_it_has_seen():
    """The walkthrough searches as a player must (a TextWorld game is partially observable): with the target
    out of view and a closed container in the room, the first action opens the room's first closed container,
    whether the target lies in it, in another container or in another room."""
    opened = 0
    for seed in range(200):
        d = design(seed, GameKnobs(rooms=2))
        src = d.receptacle(next(where for name, _, where in d.objects if name == d.target))
        closed = sorted(r.name for r in d.receptacles if r.room == d.start and r.closed)
        if closed and not (src.room == d.start and not src.closed):
            assert d.walkthrough()[0] == f"open {closed[0]}"
            opened += src.name != closed[0]
    assert opened > 10  # the expert opened a container the target was not in


def test_invalid_action_gets_the_games_feedback(task):
    ex = task.train[0]
    ep = task.episode(ex)
    first = ep.reset()
    obs, done = ep.step("dance with the moon")
    assert obs.startswith(INVALID) and not done and ep.invalid == 1 and ep.steps == 1
    assert obs[len(INVALID):].strip() == first[len(ex.goal):].strip()  # nothing changed


def test_vocabulary_covers_every_game_text(task):
    for ex in all_games(task):
        texts = [ex.first_observation] + [t for turn in ex.turns for t in turn]
        assert not [p for t in texts for p in unknown_pieces(TOK, t)]


def test_unknown_pieces_are_named_in_a_warning():
    with pytest.warns(UserWarning, match="2 pieces .*'zebra', '~'"):
        assert warn_unknown(TOK, ["goal: eat zebra ~"], "test") == ["zebra", "~"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_unknown(TOK, ["Q:1+2=?"], "test") == []


def test_grade_replays_the_completions_actions(task):
    ex = task.train[0]
    text = "".join(a + ("" if o is None else TOK.decode(turn_ids(TOK, o))) for a, o in task.target_turns(ex))
    assert task.grade(text, ex)
    assert task.play_stats(text, ex) == {"won": 1.0, "steps": float(len(ex.walkthrough)), "invalid": 0.0}
    assert not task.grade("look around<|im_end|>", ex)


class Walkthrough:
    """A rollout backend that writes, for each context, its game's next expert action (end token included): the
    turn is the number of end tokens the context holds."""

    def __init__(self, task, examples, turns=None):
        """``turns``: per example its (action, ...) turns to write; default the expert's ``target_turns``."""
        self.prompts = [task.prompt_ids(TOK, ex) for ex in examples]
        turns = turns or [task.target_turns(ex) for ex in examples]
        self.actions = [[TOK(t[0], add_special_tokens=False)["input_ids"] for t in game] for game in turns]

    def generate(self, model, prompts, sampling, *, stop_ids, pad_id, vocab_size, n_per_prompt=None, greedy=False):
        out = []
        for context in prompts:
            game = next(i for i, p in enumerate(self.prompts) if context[:len(p)] == p)
            out.append(self.actions[game][context.count(TOK.eos_token_id)])
        ids_BT = torch.tensor([a + [pad_id] * (max(map(len, out)) - len(a)) for a in out])
        mask_BT = ids_BT != pad_id
        prompt_ids, prompt_mask = left_pad(prompts, pad_id)
        return Rollout(prompt_ids, prompt_mask, ids_BT, mask_BT, torch.zeros(ids_BT.shape), ~mask_BT.all(-1),
                       torch.arange(len(prompts)))


def test_sft_rows_are_what_play_feeds_the_model(task, task_cfg):
    """The bootstrap's SFT sequence of a game (tokens and trained positions) equals, token for token, the context
    play() builds when the model writes the walkthrough: the teacher is trained on what it sees at play time,
    cut at ``task.max_turns`` as play cuts it."""
    games = all_games(task)
    assert max(len(ex.walkthrough) for ex in games) > task_cfg.max_turns  # the cut is exercised
    prompts = [task.prompt_ids(TOK, ex) for ex in games]
    ro, episodes = play(Walkthrough(task, games), None, TOK, prompts, episode_makers(task, games),
                        SamplingConfig(), stop_ids=[TOK.eos_token_id], pad_id=TOK.pad_token_id, vocab_size=V,
                        max_turns=task_cfg.max_turns, max_action_tokens=task_cfg.max_action_tokens,
                        n_per_prompt=1, greedy=True)
    for r, (ids, labels) in enumerate(sft_rows(task, TOK, games)):
        seen = ro.completion_mask_BT[r]
        assert prompts[r] + ro.completion_ids_BT[r][seen].tolist() == ids
        assert [False] * len(prompts[r]) + ro.action_mask_BT[r][seen].tolist() == [t != -100 for t in labels]
        assert episodes[r].won == (len(games[r].walkthrough) <= task_cfg.max_turns)


def test_detour_rows_are_what_play_feeds_the_model_and_train_only_the_experts_actions(task, task_cfg):
    """A detoured SFT row (``sft_detours``): its rejected action and the game's real reply are exactly what play()
    feeds the model when it writes that action (the game rejects it: one invalid action), and its labels train
    every expert action and nothing of the rejected one."""
    games = all_games(task)
    detoured = task.detours(games, 1, seed=0)  # one a game: the scripted backend finds a row by its prompt
    assert len(detoured) == len(games) and detoured != task.detours(games, 1, seed=1)
    examples, turns = [ex for ex, _ in detoured], [t for _, t in detoured]
    prompts = [task.prompt_ids(TOK, ex) for ex in examples]
    ro, episodes = play(Walkthrough(task, examples, turns), None, TOK, prompts, episode_makers(task, examples),
                        SamplingConfig(), stop_ids=[TOK.eos_token_id], pad_id=TOK.pad_token_id, vocab_size=V,
                        max_turns=task_cfg.max_turns, max_action_tokens=task_cfg.max_action_tokens,
                        n_per_prompt=1, greedy=True)
    rows = sft_rows(task, TOK, games, detours=1, seed=0)[len(games):]
    for r, (ids, labels) in enumerate(rows):
        seen = ro.completion_mask_BT[r]
        assert prompts[r] + ro.completion_ids_BT[r][seen].tolist() == ids
        assert episodes[r].invalid == 1 and sum(not trained for *_, trained in turns[r]) == 1
        rejected = TOK(next(a for a, _, trained in turns[r] if not trained), add_special_tokens=False)["input_ids"]
        trained = [t != -100 for t in labels]
        action = [False] * len(prompts[r]) + ro.action_mask_BT[r][seen].tolist()
        assert sum(action) - sum(trained) == len(rejected)  # every action trained but the rejected one
        assert all(a or not t for a, t in zip(action, trained, strict=True))
    assert len(sft_rows(task, TOK, games, detours=2, seed=0)) == 3 * len(games)


def test_a_new_bootstrap_knob_at_its_default_keeps_the_cached_pairs_keys():
    """The default math and games pairs' cache keys, pinned (2026-12-02): a knob added at its default (here
    ``sft_detours`` = 0) must not rebuild every user's pair; setting it gives a new pair."""
    from opd_exp.config import ModelConfig
    from opd_exp.models.bootstrap import cache_key, parse_bootstrap

    games, math = TaskConfig(name="agentic"), TaskConfig(name="math")
    assert cache_key(ModelConfig(), math, parse_bootstrap({})) == "fe676a1672d8"
    assert cache_key(ModelConfig(), games, parse_bootstrap({})) == "ba91ddcb532e"
    assert cache_key(ModelConfig(), games, parse_bootstrap({"teacher": {"sft_detours": 1}})) != "ba91ddcb532e"


class FakeEpisode:
    """Over after two actions; its observations are fixed text."""

    def __init__(self):
        self.won, self.steps, self.invalid = False, 0, 0

    def reset(self) -> str:
        return "kitchen."

    def step(self, action: str):
        self.steps += 1
        self.won = self.steps == 2
        return "kitchen. table: mug. exits: east.", self.won


def test_multiturn_rollout_masks_observations():
    model = tiny_llama(0)
    prompts = [TOK("<|bos|><|user|>goal: eat egg.<|assistant|>", add_special_tokens=False)["input_ids"]]
    torch.manual_seed(0)
    ro, eps = play(make_backend("hf"), model, TOK, prompts, [FakeEpisode], SamplingConfig(rollouts_per_prompt=3),
                   stop_ids=[TOK.eos_token_id], pad_id=TOK.pad_token_id, vocab_size=V, max_turns=4,
                   max_action_tokens=5)
    obs = turn_ids(TOK, "kitchen. table: mug. exits: east.")
    assert all(ep.steps == 2 and ep.won for ep in eps) and not ro.truncated_B.any()
    for r in range(3):
        seen, acts = ro.completion_mask_BT[r], ro.action_mask_BT[r]
        assert (acts <= seen).all() and (ro.sample_logprobs_BT[r][~acts] == 0).all()
        observed = ro.completion_ids_BT[r][seen & ~acts].tolist()
        assert observed == obs  # exactly one observation turn, between the two actions
        assert (ro.sample_logprobs_BT[r][acts] < 0).all()


class RejectingEpisode(FakeEpisode):
    """Rejects its first action (the game's feedback), then as FakeEpisode: over after three actions."""

    def step(self, action: str):
        self.steps += 1
        self.invalid += self.steps == 1
        self.won = self.steps == 3
        return ("invalid command. " if self.steps == 1 else "") + "kitchen.", self.won


@pytest.mark.parametrize("after_rejected", [False, True])
def test_mask_after_rejected_drops_what_follows_the_first_rejected_action(after_rejected):
    """mask.after_rejected: the rejected action stays in the loss (its context is the clean prefix), every token
    after it leaves; an episode with no rejected action keeps every action token."""
    from opd_exp.config import RunConfig
    from opd_exp.train.collect import loss_mask

    model = tiny_llama(0)
    prompts = [TOK("<|bos|><|user|>goal: eat egg.<|assistant|>", add_special_tokens=False)["input_ids"]] * 2
    torch.manual_seed(0)
    ro, eps = play(make_backend("hf"), model, TOK, prompts, [RejectingEpisode, FakeEpisode],
                   SamplingConfig(rollouts_per_prompt=1), stop_ids=[TOK.eos_token_id], pad_id=TOK.pad_token_id,
                   vocab_size=V, max_turns=4, max_action_tokens=5)
    cfg = RunConfig()
    cfg.mask.after_rejected = after_rejected
    mask = loss_mask(ro, cfg, [], torch.zeros(ro.completion_ids_BT.shape))
    first_obs = turn_ids(TOK, "invalid command. kitchen.")
    acts = ro.action_mask_BT[0]
    first_action = int(acts.long().argmin())  # the first action: tokens up to the first observation
    assert ro.completion_ids_BT[0, first_action:first_action + len(first_obs)].tolist() == first_obs
    assert eps[0].invalid == 1 and ro.after_rejected_BT[0, first_action:].all()
    assert not ro.after_rejected_BT[0, :first_action].any() and not ro.after_rejected_BT[1].any()
    assert mask[0, :first_action].all() and mask[1].equal(ro.action_mask_BT[1])
    assert mask[0, first_action:].any() != after_rejected  # the later actions: in the loss only without it
    assert int(mask[0].sum()) == (first_action if after_rejected else int(acts.sum()))


class Replay:
    """A rollout backend that returns one fixed rollout (the multi-turn one below) whatever it is asked."""

    def __init__(self, ro):
        self.ro = ro

    def generate(self, *args, **kwargs):
        return self.ro


@pytest.fixture(scope="module")
def multiturn_pair():
    """A random pair and a 2-episode multi-turn rollout of its student (observations between actions)."""
    pair = ModelPair(teacher=tiny_llama(1).eval().requires_grad_(False), student=tiny_llama(2), tokenizer=TOK,
                     teacher_tokenizer=TOK)
    prompts = [TOK("<|bos|><|user|>goal: eat egg.<|assistant|>", add_special_tokens=False)["input_ids"]]
    torch.manual_seed(0)
    ro, _ = play(make_backend("hf"), pair.student, TOK, prompts, [FakeEpisode], SamplingConfig(rollouts_per_prompt=2),
                 stop_ids=[TOK.eos_token_id], pad_id=TOK.pad_token_id, vocab_size=V, max_turns=3,
                 max_action_tokens=4)
    return pair, prompts * 2, ro


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_observation_tokens_get_exactly_zero_gradient(multiturn_pair, name):
    """collect's Batch of a multi-turn rollout, then every estimator's loss: d loss / d hidden state is exactly 0
    at every observation position (and not at every action position)."""
    pair, prompts, ro = multiturn_pair
    cfg = RunConfig()
    cfg.estimator = dataclasses.replace(cfg.estimator, name=name, top_k=8, power_alpha=0.5)
    spec = ESTIMATORS[name]
    batch, _ = collect(pair, prompts, cfg, spec.needs(cfg.estimator), Replay(ro), [])
    observation_BT = batch.attention_mask_BT & ~batch.loss_mask_BT
    assert observation_BT.any() and batch.loss_mask_BT.any()
    head = response_head(pair.student, batch.prompt_ids_BP, batch.prompt_mask_BP, batch.ids_BT,
                         batch.attention_mask_BT, V)
    head.hidden_BTH.retain_grad()
    spec.loss(head, batch, cfg.estimator).loss.backward()
    grad_BT = head.hidden_BTH.grad.abs().sum(-1)
    assert (grad_BT[observation_BT] == 0).all()
    assert (grad_BT[batch.loss_mask_BT] > 0).any()


def test_step_metrics_read_the_policys_tokens_only(multiturn_pair, monkeypatch):
    """train/teacher_logprob, logprob_gap and entropy average over the actions: observations are text neither
    model predicts (a teacher scoring its own rollouts gets ~0 on its actions and ~-15 on the observations)."""
    from opd_exp.train import step as step_mod

    pair, prompts, ro = multiturn_pair
    cfg = RunConfig()
    cfg.estimator = dataclasses.replace(cfg.estimator, name="sampled_token")
    spec = ESTIMATORS["sampled_token"]
    kept = {}
    real_collect = step_mod.collect

    def spy(*args, **kwargs):
        kept["batch"], kept["probe"] = real_collect(*args, **kwargs)
        return kept["batch"], kept["probe"]

    monkeypatch.setattr(step_mod, "collect", spy)
    opt = torch.optim.AdamW(pair.student.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    metrics, _, _ = step_mod.train_step(pair, prompts, cfg, spec, Replay(ro), opt, sched, [])
    batch, action_BT = kept["batch"], ro.action_mask_BT
    assert (batch.attention_mask_BT & ~action_BT).any()  # observations are seen
    teacher_BT = batch.teacher.sampled_logprobs_BT
    assert metrics["train/teacher_logprob"] == pytest.approx(float(teacher_BT[action_BT].mean()), rel=1e-5)
    gap_BT = teacher_BT - batch.old_logprobs_BT
    assert metrics["train/logprob_gap"] == pytest.approx(float(gap_BT[action_BT].mean()), rel=1e-5)
    assert metrics["train/teacher_logprob"] != pytest.approx(float(teacher_BT[batch.attention_mask_BT].mean()))


def test_mix_alternates_as_configured(task_cfg):
    assert schedule({"math": 1, "agentic": 1}) == ["math", "agentic"]
    assert schedule({"math": 2, "agentic": 1}) == ["math", "agentic", "math"]
    assert schedule({"math": 0, "agentic": 3}) == ["agentic"] * 3
    mix = make_task(dataclasses.replace(task_cfg, name="math_agentic", mix={"math": 2, "agentic": 1}))
    steps = [step_task(mix, s) for s in range(6)]
    assert [t.name for t, _ in steps] == ["math", "agentic", "math"] * 2
    assert [k for _, k in steps] == [0, 0, 1, 2, 1, 3]  # each task's own batch counter
    assert sorted(mix.eval_splits) == ["agentic/hard", "agentic/id", "math/id"]
    assert episode_makers(*steps[0][:1], mix.tasks["math"].train[:1]) is None
    assert episode_makers(mix.tasks["agentic"], mix.tasks["agentic"].train[:1]) is not None


def test_each_tasks_rows_are_scored_by_its_teacher(task):
    """model.teachers: the agentic rows of a mix are scored by the agentic teacher, the math rows by the pair's."""
    default, own = tiny_llama(1).eval().requires_grad_(False), tiny_llama(3).eval().requires_grad_(False)
    pair = ModelPair(teacher=default, student=tiny_llama(2), tokenizer=TOK, teacher_tokenizer=TOK,
                     teachers={"agentic": own})
    cfg = RunConfig()
    cfg.estimator = dataclasses.replace(cfg.estimator, name="sampled_token")
    cfg.sampling = dataclasses.replace(cfg.sampling, rollouts_per_prompt=1, max_new_tokens=6)
    cfg.task = dataclasses.replace(cfg.task, max_turns=2, max_action_tokens=4)
    needs = ESTIMATORS["sampled_token"].needs(cfg.estimator)
    for name, teacher, episodes in (("math", default, None),
                                    ("agentic", own, episode_makers(task, task.train[:2]))):
        prompts = [task.prompt_ids(TOK, ex) for ex in task.train[:2]]
        batch, _ = collect(pair.for_task(name), prompts, cfg, needs, make_backend("hf"), [], episodes=episodes)
        with torch.no_grad():
            head = response_head(teacher, batch.prompt_ids_BP, batch.prompt_mask_BP, batch.ids_BT,
                                 batch.attention_mask_BT, V)
            expected_BT = torch.log_softmax(head.hidden_BTH @ head.weight_VH.T, -1).gather(
                -1, batch.ids_BT[..., None]).squeeze(-1)
        m = batch.attention_mask_BT
        torch.testing.assert_close(batch.teacher.sampled_logprobs_BT[m], expected_BT[m], atol=1e-5, rtol=1e-5)


def test_scienceworld_adapter_plays_a_task():
    """ScienceWorld (needs Java and the ``scienceworld`` package): an invalid action is answered, not raised."""
    import shutil

    if shutil.which("java") is None:
        pytest.skip("ScienceWorld needs Java")
    pytest.importorskip("scienceworld")
    from opd_exp.tasks.env import ScienceWorldEpisode

    ep = ScienceWorldEpisode("boil", 0)
    assert ep.reset().startswith("goal: ")
    obs, done = ep.step("dance with the moon")
    assert isinstance(obs, str) and not done and ep.steps == 1 and not ep.won


def test_unknown_task_teacher_is_a_config_error():
    from opd_exp.config import load_run_config
    from opd_exp.config.validation import ConfigError

    with pytest.raises(ConfigError, match="unknown task 'agentc'") as err:
        load_run_config({"model": {"teachers": {"agentc": "/tmp/x"}}})
    assert err.value.field == "model.teachers" and "math, agentic" in str(err.value)
