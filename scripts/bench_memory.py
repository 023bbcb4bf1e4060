"""Peak memory of one OPD step with a real-size vocabulary, per objective and per phase, and its growth with T, V.

Usage:
    python scripts/bench_memory.py                  # every objective at V = 151,646, T = 256; growth with T and V
    python scripts/bench_memory.py --quick          # topk_rkl and full_rkl only, shorter growth sweep
    python scripts/bench_memory.py --cli-all        # also the whole `opd-exp` run for every objective
    python scripts/bench_memory.py --one topk_rkl 256 151646   # one in-process measurement (JSON on stdout)

The pair is Qwen2-shaped and randomly initialised (hidden 64, 2 layers; the memory at issue is the vocabulary's):
a tokenizer of V ids (the embedded character vocabulary plus filler tokens), the teacher's embedding padded to
152,064 rows as Qwen2.5-7B's is and the student's to 151,936 as Qwen2.5-0.5B's is (V + 418 and V + 290 at other
V). Each measurement runs in a fresh process: 4 prompts x 2 rollouts, ``max_new_tokens`` = T (no end token is
written, so every response has T tokens), K = 32, one step. A thread samples the process's RSS every 5 ms and
keeps the peak of each phase: ``rollout`` (sampling), ``scoring`` (pi_old and teacher scores), ``update`` (the
student's forward, the loss, backward and the optimizer step). ``cli_peak_mb`` is the whole ``opd-exp`` run
(loading, evaluation of 4 prompts, one step, checkpoint) in a child process, read from its rusage.

Writes results/bench/memory.{csv,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "results" / "bench"
ESTIMATORS = ["sampled_token", "seq_rkl", "topk_rkl", "topk_v2", "topk_v3", "topk_v4", "topk_v5", "full_rkl",
              "forward_kl", "jsd", "seq_kd"]
TEACHER_PAD, STUDENT_PAD = 152064 - 151646, 151936 - 151646


def build_pair(root: Path, vocab: int) -> tuple[Path, Path]:
    """save_pretrained dirs of a random Qwen2 teacher (hidden 64) and student (hidden 32) over a ``vocab``-id
    tokenizer; embeddings padded beyond it. Cached under ``root``."""
    teacher_dir, student_dir = root / f"v{vocab}" / "teacher", root / f"v{vocab}" / "student"
    if (student_dir / "config.json").is_file():
        return teacher_dir, student_dir
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    from opd_exp.models import tokenization as T

    base = {tok: i for i, tok in enumerate(T.SPECIALS + T.CHARS)}
    vocab_map = base | {f"<f{i}>": len(base) + i for i in range(vocab - len(base))}
    core = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token=T.UNK))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(T.SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=T.BOS, eos_token=T.EOS, pad_token=T.PAD,
                                  unk_token=T.UNK, additional_special_tokens=T.SPECIALS[4:], padding_side="left")
    tok.chat_template = T.CHAT_TEMPLATE
    assert len(tok) == vocab, len(tok)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    for path, hidden, rows in ((teacher_dir, 64, vocab + TEACHER_PAD), (student_dir, 32, vocab + STUDENT_PAD)):
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=rows, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=1024,
                             tie_word_embeddings=True, **ids)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tok.save_pretrained(path)
    return teacher_dir, student_dir


class PeakRSS:
    """Samples this process's RSS every 2 ms; ``phase(name)`` starts attributing samples to ``name``."""

    def __init__(self):
        self.peaks: dict[str, int] = {}
        self.name, self._stop = "setup", False
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * self._page

    def _run(self):
        while not self._stop:
            self.peaks[self.name] = max(self.peaks.get(self.name, 0), self.rss())
            time.sleep(0.005)

    def phase(self, name: str) -> None:
        self.peaks[self.name] = max(self.peaks.get(self.name, 0), self.rss())
        self.name = name

    def stop(self) -> dict[str, int]:
        self.phase("done")
        self._stop = True
        self._thread.join()
        return self.peaks


def measure_one(estimator: str, T: int, vocab: int, pair_root: Path) -> dict:
    """One step in this process, peaks per phase (MB above the RSS with both models loaded)."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from opd_exp.config import load_run_config
    from opd_exp.models.pair import load_pair
    from opd_exp.objectives import ESTIMATORS as SPECS
    from opd_exp.rollout import make_backend
    from opd_exp.tasks.base import make_task
    from opd_exp.train import collect as collect_mod
    from opd_exp.train.update import update

    teacher_dir, student_dir = build_pair(pair_root, vocab)
    torch.set_num_threads(2)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        node = compose("config", overrides=[
            f"estimator={estimator}", "estimator.top_k=32", "model.kind=pretrained", f"model.name=qwen2-v{vocab}",
            f"model.teacher_path={teacher_dir}", f"model.student_path={student_dir}", "train.prompts_per_step=4",
            "sampling.rollouts_per_prompt=2", f"sampling.max_new_tokens={T}", "train.mini_batch_size=8",
            "task.n_train=64", "task.n_eval=4"])
    plain = OmegaConf.to_container(node, resolve=True)
    plain.pop("hydra", None)
    cfg = load_run_config(plain)
    torch.manual_seed(0)
    pair = load_pair(cfg.model, cfg.task, "cpu")
    task = make_task(cfg.task)
    spec = SPECS[cfg.estimator.name]
    needs = spec.needs(cfg.estimator)
    prompts = [task.prompt_ids(pair.tokenizer, ex) for ex in task.train[:4]]
    optimizer = torch.optim.AdamW(pair.student.parameters(), lr=1e-4)
    meter = PeakRSS()
    base = meter.rss()
    backend = make_backend("hf")

    class Phased:  # the rollout phase ends where scoring starts
        def generate(self, *args, **kwargs):
            meter.phase("rollout")
            out = backend.generate(*args, **kwargs)
            out.completion_mask_BT[:] = True  # no end token: every row is T tokens (the worst case)
            out.action_mask_BT[:] = True
            meter.phase("scoring")
            return out

    start = time.time()
    batch, _ = collect_mod.collect(pair, prompts, cfg, needs, Phased(), [], diag_top_k=0)
    meter.phase("update")
    update(pair.student, batch, spec, cfg, optimizer, pair.vocab_size)
    seconds = time.time() - start
    peaks = meter.stop()
    mb = lambda b: round((b - base) / 2**20, 1)  # noqa: E731
    return {"estimator": estimator, "T": T, "V": vocab, "rows": len(batch), "positions": int(batch.ids_BT.numel()),
            "base_rss_mb": round(base / 2**20, 1), "rollout_mb": mb(peaks.get("rollout", base)),
            "scoring_mb": mb(peaks.get("scoring", base)), "update_mb": mb(peaks.get("update", base)),
            "step_peak_rss_mb": round(max(peaks.values()) / 2**20, 1), "seconds": round(seconds, 1)}


def cli_peak(estimator: str, T: int, vocab: int, pair_root: Path) -> float:
    """Peak RSS (MB) of ``opd-exp`` for one step of this pair in a child process (its own rusage)."""
    teacher_dir, student_dir = build_pair(pair_root, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "opd_exp", f"estimator={estimator}", "estimator.top_k=32",
               "model.kind=pretrained", f"model.name=qwen2-v{vocab}", f"model.teacher_path={teacher_dir}",
               f"model.student_path={student_dir}", "train.prompts_per_step=4", "sampling.rollouts_per_prompt=2",
               f"sampling.max_new_tokens={T}", "train.mini_batch_size=8", "train.steps=1", "task.n_train=64",
               "task.n_eval=4", "eval.k=1", "eval.max_new_tokens=16", "eval.teacher=false", "threads=2",
               f"model.cache_dir={tmp}/cache", f"hydra.run.dir={tmp}/run"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=CHILD_ENV)
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read()[-2000:]}")
        return round(usage.ru_maxrss / 1024, 1)


# glibc keeps freed blocks below its (adaptive) mmap threshold resident: a fixed threshold returns large blocks to
# the OS when freed, so the RSS of a phase measures what it holds, not what an earlier phase left behind
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def run_child(estimator: str, T: int, vocab: int, pair_root: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", estimator, str(T), str(vocab), "--pairs",
                          str(pair_root)], cwd=REPO, capture_output=True, text=True, env=CHILD_ENV)
    if out.returncode:
        return {"estimator": estimator, "T": T, "V": vocab, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def write(rows: list[dict]) -> None:
    import pandas as pd

    from opd_exp.toy.stats import to_markdown

    OUT.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    frame = frame.sort_values(["estimator", "V", "T"], kind="stable")
    frame.to_csv(OUT / "memory.csv", index=False)
    note = ("Peak RSS of one OPD step (4 prompts x 2 rollouts, K = 32, random Qwen2-shaped pair, CPU, 2 threads), "
            "each row a fresh process. rollout/scoring/update: peak RSS during that phase minus the RSS with "
            "both models loaded (MB); step_peak_rss_mb: the whole step's absolute peak; cli_peak_mb: the "
            "whole `opd-exp` run (loading, a 4-prompt evaluation, one step, checkpoint), for topk_rkl and "
            "full_rkl (`--cli-all`: every objective). Command: "
            "`python scripts/bench_memory.py`.")
    (OUT / "memory.md").write_text(f"# Memory of one OPD step\n\n{note}\n\n{to_markdown(frame)}")
    print(frame.tail(1).to_string(index=False, header=False), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", nargs=3, metavar=("ESTIMATOR", "T", "V"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cli-all", action="store_true", help="whole-run peak for every objective (default: "
                        "topk_rkl and full_rkl)")
    parser.add_argument("--pairs", default=str(Path(tempfile.gettempdir()) / "opd_exp_bench_pairs"))
    args = parser.parse_args()
    pair_root = Path(args.pairs)
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), int(args.one[2]), pair_root)))
        return
    names = ["topk_rkl", "full_rkl"] if args.quick else ESTIMATORS
    rows = []
    for name in names:
        row = run_child(name, 256, 151646, pair_root)
        wants_cli = args.cli_all or name in ("topk_rkl", "full_rkl")
        row["cli_peak_mb"] = cli_peak(name, 256, 151646, pair_root) if wants_cli and "error" not in row else None
        rows.append(row)
        write(rows)  # after every row: a long benchmark stopped half-way keeps what it measured
    for name in ("topk_rkl", "full_rkl"):  # growth with T at the real V, and with V at T = 256
        for T in (64, 128):
            rows.append(run_child(name, T, 151646, pair_root))
            write(rows)
        for vocab in (16384,) if args.quick else (16384, 65536):
            rows.append(run_child(name, 256, vocab, pair_root))
            write(rows)


if __name__ == "__main__":
    main()
