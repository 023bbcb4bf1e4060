"""Time of the agentic task's episodes: a TextWorld game loaded per episode (``textworld.start`` each reset, as
before the per-process cache) against the loaded game copied (``opd_exp.tasks.env.loaded_textworld_game``).

Usage:
    python scripts/bench_env.py                            # 16 generated games x 4 episodes x 3 rounds
    python scripts/bench_env.py --games 8 --rounds 5 --out /tmp/bench

An episode is what an agentic rollout plays: reset, one invalid action, then the game's walkthrough (the expert's
actions, all valid) to the win. Both modes play the same episodes through ``TextWorldEpisode``; "load per
episode" replaces the cached loader by its undecorated function (``__wrapped__``: textworld.start on every
reset), so the two differ in that alone. The observations of both modes are compared and must be equal. Times are
the median over rounds of one round's seconds per episode and per step (reset excluded), one process, one thread.

Writes <out>/env.csv and <out>/env.md (command, machine, date) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from opd_exp.config import TaskConfig
from opd_exp.tasks import env as env_mod
from opd_exp.tasks.base import make_task
from opd_exp.tasks.env import TextWorldEpisode

REPO = Path(__file__).resolve().parent.parent


def play_round(games: list, episodes_per_game: int) -> tuple[float, float, int, list[str]]:
    """(seconds in resets, seconds in steps, steps, every observation) of one round over ``games``."""
    reset_s = step_s = 0.0
    steps, seen = 0, []
    for game in games:
        for _ in range(episodes_per_game):
            episode = TextWorldEpisode(game.file, game.goal)
            t0 = time.perf_counter()
            seen.append(episode.reset())
            t1 = time.perf_counter()
            for action in ["dance with the moon", *game.walkthrough]:
                seen.append(episode.step(action)[0])
                steps += 1
            reset_s += t1 - t0
            step_s += time.perf_counter() - t1
    return reset_s, step_s, steps, seen


def bench(games: list, episodes_per_game: int, rounds: int) -> tuple[list[dict], bool]:
    cached = env_mod.loaded_textworld_game
    modes = {"load per episode": cached.__wrapped__, "loaded once, copied": cached}
    rows, observations = [], {}
    for mode, loader in modes.items():
        env_mod.loaded_textworld_game = loader
        try:
            rounds_out = [play_round(games, episodes_per_game) for _ in range(rounds)]
        finally:
            env_mod.loaded_textworld_game = cached
        n_episodes = len(games) * episodes_per_game
        steps = rounds_out[0][2]
        observations[mode] = rounds_out[-1][3]
        rows.append({"mode": mode, "episodes": n_episodes, "steps": steps,
                     "reset_ms": 1e3 * statistics.median(r[0] for r in rounds_out) / n_episodes,
                     "step_ms": 1e3 * statistics.median(r[1] for r in rounds_out) / steps,
                     "episode_ms": 1e3 * statistics.median(r[0] + r[1] for r in rounds_out) / n_episodes})
    return rows, len(set(map(tuple, observations.values()))) == 1


def write(rows: list[dict], same: bool, out: Path, argv: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "env.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    base = rows[0]["episode_ms"]
    lines = ["# Agentic episodes: a game loaded per episode vs loaded once and copied", "",
             f"Command: `python scripts/bench_env.py {' '.join(argv)}`; {datetime.date.today()}; machine: "
             f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}. "
             "Medians over rounds, one process (see the script's docstring).", "",
             "| mode | episodes | steps | reset (ms) | step (ms) | episode (ms) | episode vs load per episode |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['episodes']} | {r['steps']} | {r['reset_ms']:.2f} | {r['step_ms']:.2f} | "
              f"{r['episode_ms']:.2f} | {r['episode_ms'] / base:.2f}x |" for r in rows]
    lines += ["", f"Observations of both modes equal: {same}."]
    text = "\n".join(lines) + "\n"
    (out / "env.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--games", type=int, default=16, help="generated training games (2 rooms, the default's)")
    ap.add_argument("--episodes-per-game", type=int, default=4, help="episodes of a game a round (rollouts)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as games_dir:
        task = make_task(TaskConfig(name="agentic", n_train_games=args.games, n_eval_games=1, games_dir=games_dir,
                                    game_workers=1, eval_splits={"id": {}}))
        rows, same = bench(task.train, args.episodes_per_game, args.rounds)
    write(rows, same, args.out, argv)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
