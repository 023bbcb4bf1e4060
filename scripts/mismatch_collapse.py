"""What the student writes at the end of a run, and what the teacher says of it: the evidence behind the
mismatched pair's collapse (issue #15; results/math_main/collapse.md, explained in the README's "Paper tables").

    python scripts/mismatch_collapse.py LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--out results/math_main/collapse.md]
    python scripts/mismatch_collapse.py --sweep multirun/mismatch_collapse --out results/math_main/collapse.md

``--sweep`` reads every finished run of a sweep dir (conf/experiment/mismatch_collapse.yaml), labelled by its
``recipe`` choice in the sweep's order.

Per run, from its last ``diag/samples_step*.npz`` (every sampled token of that step's rollouts, with the student's
and the teacher's log-probs; opd_exp/train/diagnostics.py) and its run_summary.json: the response length, how
often each end/delimiter token is written, the share of responses that write the teacher's end token before
their own stop, the teacher's mean log-prob of its end token the first time a response writes it and every time
after (tokens the teacher scores past its own end), response length and entropy at the first and last step
(metrics.jsonl), the student's accuracy before and after, and a few diagnostics over training (TRAJECTORY).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from opd_exp.rundir import read_metrics

WATCHED = ("<|endoftext|>", "<reason>", "</reason>", "<|im_end|>", "<think>", "</think>")


def last_samples(run: Path) -> tuple[int, dict]:
    files = sorted((run / "diag").glob("samples_step*.npz"), key=lambda p: int(p.stem.removeprefix("samples_step")))
    if not files:
        raise SystemExit(f"{run}: no diag/samples_step*.npz (train.diag_every > 0 writes them)")
    z = np.load(files[-1])
    return int(files[-1].stem.removeprefix("samples_step")), {k: z[k] for k in z.files}


def _writes_answer(s: dict, row: int, vocab: dict[str, int]) -> bool:
    """The row holds the answer prefix "A:" (two ids, "A" then ":"), which the grader reads the answer after."""
    ids = s["token_id"][np.flatnonzero(s["row"] == row)[np.argsort(s["abs_pos"][s["row"] == row])]]
    return bool(np.any((ids[:-1] == vocab["A"]) & (ids[1:] == vocab[":"])))


def summarise(run: Path, vocab: dict[str, int]) -> dict:
    """The numbers of one run (module docstring)."""
    step, s = last_samples(run)
    rows = np.unique(s["row"])
    out = {"step": step, "responses": len(rows), "mean_len": len(s["token_id"]) / max(1, len(rows))}
    for tok in WATCHED:
        out[f"n {tok}"] = int((s["token_id"] == vocab[tok]).sum()) if tok in vocab else 0
    eot = vocab["<|endoftext|>"]
    first_lp, later_lp, rows_with_eot = [], [], 0
    for r in rows:
        sel = np.flatnonzero(s["row"] == r)
        sel = sel[np.argsort(s["abs_pos"][sel])]  # the row's tokens in order
        ids, lp = s["token_id"][sel], s["teacher_logprob"][sel]
        hits = np.flatnonzero(ids == eot)
        if hits.size:
            rows_with_eot += 1
            first_lp.append(lp[hits[0]])
            later_lp.extend(lp[hits[1:]])
    out["rows writing <|endoftext|>"] = rows_with_eot / max(1, len(rows))
    out["rows writing A:"] = float(np.mean([_writes_answer(s, r, vocab) for r in rows]))
    first = np.load(sorted((run / "diag").glob("samples_step*.npz"),
                           key=lambda p: int(p.stem.removeprefix("samples_step")))[0])
    out["teacher logp per token first -> last step"] = (f"{np.mean(first['teacher_logprob']):.3g} -> "
                                                        f"{np.mean(s['teacher_logprob']):.3g}")
    out["teacher logp, first <|endoftext|>"] = float(np.mean(first_lp)) if first_lp else float("nan")
    out["teacher logp, later <|endoftext|>"] = float(np.mean(later_lp)) if later_lp else float("nan")
    steps = [m for m in read_metrics(run) if "step" in m and "train/response_len" in m]
    for key in ("train/response_len", "train/entropy"):
        out[f"{key.split('/')[1]} first -> last step"] = f"{steps[0][key]:.3g} -> {steps[-1][key]:.3g}"
    summary = json.loads((run / "run_summary.json").read_text())["results"]
    for who in ("student_before", "student_after"):
        out[f"{who} avg@4"] = summary.get(f"{who}/avg/avg@4", float("nan"))
    return out


TRAJECTORY = ("diag/teacher/student_topk_mass", "diag/special/completion_frac", "train/entropy",
              "diag/len/truncated_frac")


def trajectory(run: Path, key: str, points: int = 6) -> str:
    """``key`` at ``points`` evenly spaced logged steps, first and last included: "step:value ..."."""
    logged = [(int(r["step"]), float(r[key])) for r in read_metrics(run) if key in r and "step" in r]
    if not logged:
        return "-"
    picks = sorted({round(i * (len(logged) - 1) / (points - 1)) for i in range(points)})
    return " ".join(f"{logged[i][0]}:{logged[i][1]:.2f}" for i in picks)


def sweep_runs(sweep: Path) -> list[str]:
    """LABEL=RUN_DIR for every completed run under ``sweep``, in the sweep's job order, labelled by the
    ``recipe=`` override (every override when there is none)."""
    found = []
    for path in sweep.rglob("run_summary.json"):  # a recipe=a/b value nests its cell one dir deeper
        summary = json.loads(path.read_text())
        if summary.get("status") != "completed":
            continue
        overrides = summary.get("overrides", [])
        label = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), " ".join(overrides))
        hydra_file = path.parent / ".hydra" / "hydra.yaml"
        job_num = OmegaConf.load(hydra_file).hydra.job.num if hydra_file.exists() else 0
        found.append((job_num, f"{label}={path.parent}"))
    if not found:
        raise SystemExit(f"{sweep}: no completed run (run_summary.json with status completed)")
    return [item for _, item in sorted(found)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="LABEL=RUN_DIR")
    parser.add_argument("--sweep", default=None, help="a sweep dir: each finished run, labelled by its recipe")
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args()
    if args.sweep:
        args.runs += sweep_runs(Path(args.sweep))
    if not args.runs:
        parser.error("name runs (LABEL=RUN_DIR) or a --sweep dir")
    from opd_exp.models.tokenization import build_tokenizer

    vocab = build_tokenizer().get_vocab()
    results = {}
    for item in args.runs:
        label, _, path = item.partition("=")
        results[label] = summarise(Path(path), vocab)
    keys = list(next(iter(results.values())))
    lines = ["# The mismatched pair's collapse: what the student writes", "",
             "Runs (`opd-exp <overrides>`, from each run_summary.json):", ""]
    for item in args.runs:
        label, _, path = item.partition("=")
        summary = json.loads((Path(path) / "run_summary.json").read_text())
        lines.append(f"- {label}: `opd-exp {' '.join(summary.get('overrides', []))}` (code "
                     f"{str(summary.get('git_commit'))[:10]}{', dirty' if summary.get('git_dirty') else ''})")
    lines += ["", f"Command: `python scripts/mismatch_collapse.py {shlex.join(args.runs)}`", "",
              "At the last step (from diag/samples_step*.npz), and the student's avg@4 over the splits:", "",
              "| " + " | ".join(["run", *keys]) + " |", "|" + "---|" * (len(keys) + 1)]
    for label, r in results.items():
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += ["", "Over training (step:value): the student's probability mass on the teacher's top-K "
              "(diag/teacher/student_topk_mass), the share of completion tokens that are the student's special "
              "tokens, the student's entropy (nats), the share of responses cut at max_new_tokens.", "",
              "| run | " + " | ".join(TRAJECTORY) + " |", "|" + "---|" * (len(TRAJECTORY) + 1)]
    for item in args.runs:
        label, _, path = item.partition("=")
        lines.append("| " + " | ".join([label, *(trajectory(Path(path), k) for k in TRAJECTORY)]) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
