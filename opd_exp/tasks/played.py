"""What every task played as episodes shares: the first observation as the prompt, grading by replay, play stats.

    class MyGames(PlayedTask):                     # a multi-turn task
        def episode(self, example): ...            # a fresh Episode (opd_exp/tasks/env.py)
        def first_observation(self, example): ...  # the text reset() returns: the prompt's user turn
        def completion_actions(self, text): ...    # the actions a decoded completion wrote

A completion is graded exactly as it was played: :meth:`PlayedTask.replay` plays its actions in a fresh episode
(at most ``task.max_turns``, stopping when the game is over); success = the episode is won.

:class:`ChatTurns` reads the actions out of a completion decoded from a real pair's tokens, whatever its chat
template: play() (opd_exp/rollout/multiturn.py) appends after each action its stop token and the template's
next user turn (the observation) with the assistant's generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd_exp.tasks.prompts import text_ids, user_prompt_text

MARK = "\x00"  # stands for the observation when the template's turn is rendered


@dataclass(frozen=True)
class ChatTurns:
    """The pieces of a tokenizer's chat template that frame an observation turn, and its special tokens::

        action <stop> {user_open} observation {assistant_open} action <stop> ...

    An action is the text after an ``assistant_open`` (or the completion's start) up to the first special token
    or ``user_open`` (an action cut at ``task.max_action_tokens`` has no stop token)."""

    user_open: str
    assistant_open: str
    specials: tuple[str, ...]

    @classmethod
    def of(cls, tokenizer) -> ChatTurns:
        head = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        before = tokenizer.apply_chat_template(head, tokenize=False)
        after = tokenizer.apply_chat_template(head + [{"role": "user", "content": MARK}], tokenize=False,
                                              add_generation_prompt=True)
        user_open, assistant_open = after[len(before):].split(MARK)
        specials = tuple(t for t in tokenizer.all_special_tokens if t)
        return cls(user_open=user_open, assistant_open=assistant_open, specials=specials)

    def actions(self, completion_text: str) -> list[str]:
        """One action per turn the completion played, in order (an empty one where the model wrote nothing)."""
        opener = self.assistant_open.strip()
        pieces = completion_text.split(opener) if opener else [completion_text]
        marks = [m for m in (*self.specials, self.user_open.strip()) if m]
        return [piece[:min([piece.find(m) for m in marks if m in piece] or [len(piece)])].strip()
                for piece in pieces]


class PlayedTask:
    """The prompt, replay, grade and play stats of a multi-turn task (see the module docstring). Subclasses set
    ``cfg`` and define ``episode``, ``first_observation`` and ``completion_actions``."""

    def prompt_text(self, tokenizer, example) -> str:
        """The first observation (goal included) as the user turn, ending with the assistant's generation
        prompt."""
        return user_prompt_text(tokenizer, self.first_observation(example))

    def prompt_ids(self, tokenizer, example) -> list[int]:
        return text_ids(tokenizer, self.prompt_text(tokenizer, example))

    def replay(self, completion_text: str, example):
        """A fresh episode played through the completion's actions (stopping when the game is over)."""
        ep = self.episode(example)
        ep.reset()
        for action in self.completion_actions(completion_text)[: self.cfg.max_turns]:
            if ep.step(action)[1]:
                break
        return ep

    def grade(self, completion_text: str, example) -> bool:
        """Whether the completion's actions win the game."""
        return self.replay(completion_text, example).won

    def play_stats(self, completion_text: str, example) -> dict[str, float]:
        """{"won", "steps", "invalid"} of the completion's replay."""
        ep = self.replay(completion_text, example)
        return {"won": float(ep.won), "steps": float(ep.steps), "invalid": float(ep.invalid)}


class RealPairTask(PlayedTask):
    """A played task of an external environment, for real pairs: its observations are the engine's own English,
    which the embedded pair's 110-id tokenizer cannot hold (:func:`opd_exp.tasks.base.check_task_pair`).

    Its actions are read with the chat format of the tokenizer :meth:`prompt_ids` last rendered with (the
    evaluation, the loop and opd-exp-check render a batch's prompts before they grade it); first observations
    are made once per example by resetting an episode."""

    needs_real_pair = True
    turns: ChatTurns | None = None

    def prompt_ids(self, tokenizer, example) -> list[int]:
        self.turns = ChatTurns.of(tokenizer)
        return super().prompt_ids(tokenizer, example)

    def first_observation(self, example) -> str:
        cache = self.__dict__.setdefault("_first_observations", {})
        if example not in cache:
            cache[example] = self.episode(example).reset()
        return cache[example]

    def completion_actions(self, completion_text: str) -> list[str]:
        if self.turns is None:
            raise RuntimeError(f"{self.name}: prompt_ids(tokenizer, ...) renders a prompt before a completion is "
                               "graded (its chat format tells where each action ends)")
        return self.turns.actions(completion_text)
