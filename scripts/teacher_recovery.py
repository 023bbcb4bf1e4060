"""Is a games teacher a good judge of the student's contexts? Its greedy success from each game's start, and after
the student's own (greedy) first action, split by whether the game rejected that action.

    python scripts/teacher_recovery.py --teacher T --student S --tokenizer TOK [--split id] [--games 50]
        [overrides of the task=agentic config, e.g. task.games_dir=/tmp/cache]

The task is ``task=agentic`` composed from conf/ as the CLI does (games generated into the cache on first use).
Prints one line and writes it to results/agentic/teacher_recovery.tsv (appended). Observations follow the
action exactly as ``play()`` feeds them: the student's action and the game's reply are the teacher's context.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def task_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from opd_exp.config import load_run_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return load_run_config(compose("config", overrides=["task=agentic", *overrides])).task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--split", default="id")
    ap.add_argument("--games", type=int, default=50)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_exp.config import SamplingConfig
    from opd_exp.rollout import make_backend
    from opd_exp.rollout.multiturn import play, turn_ids
    from opd_exp.tasks.base import make_task

    cfg = task_config(args.overrides)
    task = make_task(cfg)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    student = AutoModelForCausalLM.from_pretrained(args.student).eval()
    end = tok.convert_tokens_to_ids(task.convention.end)
    games = task.eval_splits[args.split][: args.games]
    prompts = [task.prompt_ids(tok, ex) for ex in games]
    fresh = [lambda ex=ex: task.episode(ex) for ex in games]
    kw = dict(stop_ids=[end], pad_id=tok.pad_token_id, vocab_size=len(tok), max_action_tokens=cfg.max_action_tokens,
              greedy=True, n_per_prompt=1)
    backend, sampling = make_backend("decode"), SamplingConfig()
    clean = play(backend, teacher, tok, prompts, fresh, sampling, max_turns=cfg.max_turns, **kw)[1]
    first = play(backend, student, tok, prompts, fresh, sampling, max_turns=1, **kw)[0]
    contexts, resumed, rejected = [], [], []
    for i, ex in enumerate(games):
        action = first.completion_ids_BT[i, : int(first.completion_mask_BT[i].sum())].tolist()
        text = tok.decode([t for t in action if t != end], skip_special_tokens=True)
        episode = task.episode(ex)
        episode.reset()
        observation, _ = episode.step(text)
        rejected.append(episode.invalid > 0)
        contexts.append(prompts[i] + action + ([end] if action[-1:] != [end] else []) + turn_ids(tok, observation))

        def after_first(ex=ex, text=text):
            ep = task.episode(ex)
            ep.reset()
            ep.step(text)
            ep.reset = lambda: None  # play() resets every episode: this one starts after the student's action
            return ep

        resumed.append(after_first)
    after = play(backend, teacher, tok, contexts, resumed, sampling, max_turns=cfg.max_turns - 1, **kw)[1]
    won_bad = sum(ep.won for ep, bad in zip(after, rejected, strict=True) if bad)
    won_ok = sum(ep.won for ep, bad in zip(after, rejected, strict=True) if not bad)
    n_bad = sum(rejected)
    line = (f"{args.split}: teacher from the start {sum(ep.won for ep in clean)}/{len(games)}; after the student's "
            f"first action: rejected {won_bad}/{n_bad}, accepted {won_ok}/{len(games) - n_bad}")
    print(line)
    out = REPO / "results" / "agentic" / "teacher_recovery.tsv"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("date\tteacher\tstudent\tsplit\tgames\tclean_won\trejected_first\twon_after_rejected\t"
                       "won_after_accepted\n")
    with out.open("a") as f:
        f.write(f"{datetime.date.today()}\t{args.teacher}\t{args.student}\t{args.split}\t{len(games)}\t"
                f"{sum(ep.won for ep in clean)}\t{n_bad}\t{won_bad}\t{won_ok}\n")


if __name__ == "__main__":
    main()
