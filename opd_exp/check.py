"""opd-exp-check: a pre-flight of a (teacher, student) pair on a task, with the same overrides as ``opd-exp``.

Usage:
    opd-exp-check                                          # the embedded tiny pair on the arithmetic task
    opd-exp-check model=qwen_small task=champ              # a real pair on the offline CHAMP benchmark
    opd-exp-check model=pair_template model.teacher_path=T model.student_path=S task=benchmark eval.n_prompts=8
    opd-exp-check --pair-only [overrides]                  # only find (bootstrapping the tiny pair) and print it

What it does, in order, printing each part:
    1. loads the task's data and both models (time, parameters, peak memory)
    2. the tokenizer audit with the pair's own end tokens and think delimiters (opd_exp.models.audit)
    3. renders one prompt per split through the student's and the teacher's chat templates
    4. samples ``eval.n_prompts`` (default 4) prompts of the first eval split with the student and the teacher at
       the evaluation's sampling (eval.temperature, eval.top_p, eval.max_new_tokens), grades them, tokens/s
    5. scores the student's responses with the teacher: mean log-prob per token under each model, and the
       tokens the teacher finds least likely relative to the student (the paper's Fig. 5 table)
    6. what special-token masking would remove
and ends with every mismatch found. Exit status: 0 no mismatch, 1 mismatches (listed), 2 bad config or a
checkpoint / dataset that cannot be loaded (one line).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
N_PROMPTS = 4  # prompts sampled when eval.n_prompts is null
TEACHER_GAP_NATS = 10.0  # a token the teacher scores this far below the student is listed as a mismatch


def compose_config(overrides: list[str]):
    """The RunConfig ``opd-exp <overrides>`` would run (Hydra's compose API on conf/)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from opd_exp.config import load_run_config

    GlobalHydra.instance().clear()  # a caller (a test, a notebook) may hold its own
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        node = compose("config", overrides=overrides)
    plain = OmegaConf.masked_copy(node, [k for k in node if k != "hydra"])
    return load_run_config(plain)


def peak_memory_mb(device) -> float:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's max RSS on CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def render_prompts(pair, task, problems: list[str]) -> None:
    """One prompt per split through each side's chat template; differing ids are a mismatch."""
    for split, examples in [("train", task.train), *task.eval_splits.items()]:
        if not examples:
            continue
        s_ids = task.prompt_ids(pair.tokenizer, examples[0])
        print(f"  [{split}] student template, {len(s_ids)} tokens:\n    "
              + pair.tokenizer.decode(s_ids).replace("\n", "\n    "))
        if pair.teacher_tokenizer is not pair.tokenizer:
            t_ids = task.prompt_ids(pair.teacher_tokenizer, examples[0])
            if t_ids != s_ids:
                problems.append(f"[{split}] the teacher's template renders the prompt as {len(t_ids)} other ids "
                                f"than the student's {len(s_ids)}: the teacher scores the student's context")


def sample_and_grade(name: str, model, pair, task, examples, cfg, problems: list[str]):
    """Sample one response per example with ``model``; print a few, the share correct, tokens/s."""
    import torch

    from opd_exp.config import SamplingConfig
    from opd_exp.rollout import rollout, stop_ids

    sampling = SamplingConfig(temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, rollouts_per_prompt=1,
                              max_new_tokens=cfg.eval.max_new_tokens, backend=cfg.sampling.backend)
    prompts = [task.prompt_ids(pair.tokenizer, ex) for ex in examples]
    start = time.perf_counter()
    with torch.no_grad():
        ro = rollout(model, prompts, sampling, eos_id=stop_ids(model, pair.tokenizer),
                     pad_id=pair.tokenizer.pad_token_id, vocab_size=pair.vocab_size)
    seconds = time.perf_counter() - start
    texts = pair.tokenizer.batch_decode(ro.completion_ids_BT, skip_special_tokens=False)
    correct = [task.grade(t, ex) for t, ex in zip(texts, examples, strict=True)]
    n_tokens = int(ro.completion_mask_BT.sum())
    print(f"  {name}: {sum(correct)}/{len(correct)} correct, {int(ro.truncated_B.sum())} hit max_new_tokens, "
          f"{n_tokens} tokens in {seconds:.2f}s ({n_tokens / max(seconds, 1e-9):.0f} tokens/s)")
    for text, ok in list(zip(texts, correct, strict=True))[:2]:
        shown = text.replace(pair.tokenizer.pad_token or "\0", "").strip()
        print(f"    [{'correct' if ok else 'wrong'}] {shown[:300]!r}")
    if bool(ro.truncated_B.all()):
        problems.append(f"{name}: every response hit eval.max_new_tokens={cfg.eval.max_new_tokens} without its "
                        "end token: raise it, or check the stop tokens")
    return ro, correct


def score_with_teacher(pair, ro, problems: list[str]) -> None:
    """Teacher log-probs of the student's sampled tokens (chunked, never (B, T, V)) next to the sampler's."""
    import torch

    from opd_exp.models.forward import response_head
    from opd_exp.objectives.kernels import selected_logprobs

    with torch.no_grad():
        head = response_head(pair.teacher, ro.prompt_ids_BP, ro.prompt_mask_BP, ro.completion_ids_BT,
                             ro.completion_mask_BT, pair.vocab_size)
        ids_BT = ro.completion_ids_BT.to(head.hidden_BTH.device)
        teacher_BT = selected_logprobs(head, ids_BT.unsqueeze(-1), mask_BT=ro.completion_mask_BT.to(ids_BT.device))
    teacher_BT = teacher_BT.squeeze(-1).float().cpu()
    mask_BT = ro.action_mask_BT
    student_BT = ro.sample_logprobs_BT
    n = int(mask_BT.sum())
    print(f"  mean log-prob per token: student (sampler) {float(student_BT[mask_BT].sum()) / max(n, 1):.3f}, "
          f"teacher {float(teacher_BT[mask_BT].sum()) / max(n, 1):.3f} over {n} tokens")
    gap_BT = (teacher_BT - student_BT).masked_fill(~mask_BT, float("inf"))
    worst = torch.topk(gap_BT.flatten(), k=min(5, n), largest=False)
    print("  tokens the teacher finds least likely (token: student, teacher log-prob):")
    T = gap_BT.shape[1]
    for flat in worst.indices.tolist():
        b, t = divmod(flat, T)
        piece = pair.tokenizer.convert_ids_to_tokens(int(ro.completion_ids_BT[b, t]))
        s, q = float(student_BT[b, t]), float(teacher_BT[b, t])
        print(f"    {piece!r}: {s:.2f}, {q:.2f}")
        if s - q >= TEACHER_GAP_NATS and piece in pair.tokenizer.all_special_tokens:
            problems.append(f"the teacher scores the student's special token {piece!r} {s - q:.1f} nats below the "
                            "student (the paper's Fig. 5): consider mask.enabled=true")


def check(cfg) -> list[str]:
    """Run every part of the module docstring's list; returns the mismatches."""
    import torch

    from opd_exp.config.validation import ConfigError
    from opd_exp.models.audit import audit_tokenizers, pair_probes
    from opd_exp.models.pair import load_pair, masked_token_ids
    from opd_exp.tasks.base import check_task_pair, make_task
    from opd_exp.train.loop import pick_device

    if cfg.model.teacher_server is not None:  # the check samples from the teacher and sizes it: it must load here
        raise ConfigError("model.teacher_server", f"got {cfg.model.teacher_server!r}; opd-exp-check loads the "
                          "teacher itself, allowed: null (model.teacher_server=null eval.teacher=true)")
    problems: list[str] = []
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    check_task_pair(cfg.task, cfg.model)
    task = make_task(cfg.task)
    pair = load_pair(cfg.model, cfg.task, device)
    params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (pair.teacher, pair.student)]
    print(f"[1] loaded task {task.name!r} ({len(task.train)} train, "
          + ", ".join(f"{k} {len(v)}" for k, v in task.eval_splits.items())
          + f") and pair {cfg.model.name!r} (teacher {params[0]:.1f}M, student {params[1]:.1f}M params, "
          f"{cfg.model.dtype}, V = {pair.vocab_size}) on {device} in {time.perf_counter() - start:.1f}s; "
          f"peak memory {peak_memory_mb(device):.0f} MB")
    report = audit_tokenizers(pair.teacher_tokenizer, pair.tokenizer, probes=pair_probes(pair, task))
    print("[2] " + report.format())
    problems += [f"audit: {m}" for m in report.mismatches]
    print("[3] prompts")
    render_prompts(pair, task, problems)
    split, examples = next(iter(task.eval_splits.items()))
    examples = examples[: cfg.eval.n_prompts or N_PROMPTS]
    print(f"[4] sampling {len(examples)} {split!r} prompts (T = {cfg.eval.temperature}, top-p {cfg.eval.top_p}, "
          f"max {cfg.eval.max_new_tokens} new tokens)")
    ro, _ = sample_and_grade("student", pair.student, pair, task, examples, cfg, problems)
    _, teacher_ok = sample_and_grade("teacher", pair.teacher, pair, task, examples, cfg, problems)
    if not any(teacher_ok):
        problems.append(f"the teacher solved none of {len(examples)} {split!r} prompts: check the prompt template "
                        "(task.prompt_template), the answer format the grader reads, eval.max_new_tokens")
    print("[5] the teacher's scores of the student's responses")
    score_with_teacher(pair, ro, problems)
    print("[6] special-token masking")
    ids = masked_token_ids(pair, cfg.mask.tokens, cfg.model.special_tokens, enabled=False)
    shown = ", ".join(f"{pair.tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in ids) or "nothing"
    print(f"  mask.enabled=true would remove: {shown}")
    if not ids:
        problems.append("special-token masking would remove nothing: set model.special_tokens")
    print(f"peak memory {peak_memory_mb(device):.0f} MB; total {time.perf_counter() - start:.1f}s")
    return problems


def main(argv: list[str] | None = None) -> None:
    from opd_exp.config.validation import ConfigError

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    pair_only = "--pair-only" in args
    args = [a for a in args if a != "--pair-only"]
    try:
        from opd_exp.models.pair import ModelLoadError, pair_paths

        cfg = compose_config(args)
        if pair_only:  # scripts/reproduce_paper.sh: the pair bootstrapped on every core before a sweep
            print("\n".join(f"{name}: {path}" for name, path in
                            zip(("teacher", "student", "tokenizer"), pair_paths(cfg.model, cfg.task), strict=True)))
            return
        problems = check(cfg)
    except (ConfigError, ModelLoadError) as err:
        print(str(err).splitlines()[0] if isinstance(err, ConfigError) else str(err), file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # Hydra's own override errors (unknown group option, bad syntax)
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            print(f"config error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        raise
    if problems:
        print(f"\n{len(problems)} MISMATCH(ES):\n" + "\n".join(f"  - {p}" for p in problems))
        sys.exit(1)
    print("\nOK: no mismatch found")


if __name__ == "__main__":
    main()
