"""Pair loading (one loader for both kinds), informative load errors, and the bootstrap cache."""

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd_exp.config import ModelConfig, TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.models import bootstrap
from opd_exp.models.bootstrap import COMPLETE, cache_key, ensure_tiny_pair, entry_dir, parse_bootstrap
from opd_exp.models.pair import ModelLoadError, load_checkpoint, load_pair, load_tokenizer, vocab_size
from opd_exp.models.tokenization import build_tokenizer

TINY_MEMBER = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "sft_steps": 2, "batch_size": 4,
               "warmup_steps": 1}
TINY_BOOT = {"teacher": TINY_MEMBER, "student": {**TINY_MEMBER, "sft_examples": 8}, "eval_examples": 4,
             "eval_max_new_tokens": 4, "progress": False}
TASK = TaskConfig(n_train=40, n_eval=4, eval_splits={"id": {}})


def save_checkpoint(path: Path, hidden: int = 16) -> Path:
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(root / "teacher", 32), save_checkpoint(root / "student", 16)


def pretrained(teacher, student, **kw) -> ModelConfig:
    return ModelConfig(kind="pretrained", teacher_path=str(teacher), student_path=str(student), **kw)


# ------------------------------------------------------------------------------------------------------------
# loading


def test_load_pair_pretrained(ckpts):
    pair = load_pair(pretrained(*ckpts), TASK, device="cpu", dtype=torch.float32)
    assert pair.teacher.config.hidden_size == 32 and pair.student.config.hidden_size == 16
    assert not pair.teacher.training and not any(p.requires_grad for p in pair.teacher.parameters())
    assert pair.student.training and all(p.requires_grad for p in pair.student.parameters())
    assert pair.tokenizer.padding_side == "left" and pair.teacher_tokenizer.padding_side == "left"
    assert pair.tokenizer.get_vocab() == pair.teacher_tokenizer.get_vocab()
    assert pair.student.dtype == torch.float32


def test_load_pair_dtype_from_config(ckpts):
    pair = load_pair(pretrained(*ckpts, dtype="bfloat16"), TASK)
    assert pair.student.dtype == torch.bfloat16 and pair.teacher.dtype == torch.bfloat16


def test_missing_dir_names_the_path(ckpts, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match=f"teacher checkpoint {missing}: no such directory"):
        load_pair(pretrained(missing, ckpts[1]), TASK)


def test_corrupt_checkpoints_name_the_path_and_problem(tmp_path):
    bad = save_checkpoint(tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"{bad}: config.json is malformed"):
        load_checkpoint(bad)
    trunc = save_checkpoint(tmp_path / "trunc")
    weights = trunc / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match=f"{trunc}: cannot be loaded"):
        load_checkpoint(trunc)
    empty = save_checkpoint(tmp_path / "empty")
    weights = empty / "model.safetensors"
    weights.unlink()
    with pytest.raises(ModelLoadError, match=f"{empty}: no weights"):
        load_checkpoint(empty)
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(tmp_path / "noconfig")


def test_vocab_size_counts_added_tokens_not_embedding_rows(ckpts):
    tok = load_tokenizer(ckpts[1])
    n = vocab_size(tok)
    tok.add_tokens(["<extra>"])
    assert n == len(build_tokenizer()) and vocab_size(tok) == n + 1


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path}: no tokenizer files"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("garbage")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=f"{tmp_path}: cannot be loaded"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# bootstrap config and cache


def test_bootstrap_config_validation():
    cfg = parse_bootstrap({"student": {"num_layers": 1}})
    assert cfg.student.num_layers == 1 and cfg.student.hidden_size == 96  # student keeps its own defaults
    with pytest.raises(ConfigError, match="model.bootstrap.student.hiden_size.*hidden_size"):
        parse_bootstrap({"student": {"hiden_size": 3}})
    with pytest.raises(ConfigError, match="num_heads"):
        parse_bootstrap({"teacher": {"hidden_size": 30, "num_heads": 4}})
    with pytest.raises(ConfigError, match="convention.*<nope>"):
        parse_bootstrap({"teacher": {"convention": {"think_open": "<nope>"}}})


def test_cache_key_changes_with_config():
    base = ModelConfig(bootstrap=TINY_BOOT)
    key = cache_key(base, TASK, parse_bootstrap(TINY_BOOT))
    other = {**TINY_BOOT, "student": {**TINY_BOOT["student"], "sft_steps": 3}}
    assert cache_key(base, TASK, parse_bootstrap(other)) != key
    assert cache_key(base, TaskConfig(n_train=41, n_eval=4), parse_bootstrap(TINY_BOOT)) != key
    # a set thread count is part of the key (it orders float reductions: the games' teacher differs with 1 and
    # 2 threads); 0, torch's default, is left out so that the pairs built before keep their keys
    threads = {n: cache_key(base, TASK, parse_bootstrap({**TINY_BOOT, "threads": n})) for n in (0, 1, 2)}
    assert len(set(threads.values())) == 3 and key in threads.values()
    assert cache_key(base, TASK, parse_bootstrap({**TINY_BOOT, "progress": True})) == key  # not part of it


def test_games_version_keys_game_pairs_only(monkeypatch):
    """A new games generator invalidates the pairs trained on games, and no math pair."""
    base, boot, games = ModelConfig(bootstrap=TINY_BOOT), parse_bootstrap(TINY_BOOT), TaskConfig(name="agentic")
    math_key, games_key = cache_key(base, TASK, boot), cache_key(base, games, boot)
    monkeypatch.setattr(bootstrap, "GAMES_VERSION", bootstrap.GAMES_VERSION + 1)
    assert cache_key(base, TASK, boot) == math_key and cache_key(base, games, boot) != games_key


def test_mix_sft_draws_each_batch_from_one_task():
    """A mix's SFT step takes all its rows from one task, in the schedule's order (math, agentic, math for
    {math: 2, agentic: 1}): math rows are never padded to a game's length."""
    widths = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids, attention_mask, labels):
            widths.append(input_ids.shape[1])
            return SimpleNamespace(loss=self.w ** 2)

    def dataset(n: int, width: int) -> tuple:
        return torch.ones(n, width, dtype=torch.long), torch.ones(n, width, dtype=torch.long), torch.full((n,), width)

    member = bootstrap.MemberConfig(sft_steps=6, batch_size=2, warmup_steps=1)
    bootstrap.sft(Probe(), [dataset(5, 3), dataset(4, 9)], [0, 1, 0], member, parse_bootstrap(TINY_BOOT),
                  evaluate=None, desc="probe")
    assert widths == [3, 9, 3] * 2


def test_bootstrap_builds_once_and_reuses(tmp_path, monkeypatch):
    model_cfg = ModelConfig(bootstrap=TINY_BOOT, cache_dir=str(tmp_path))
    entry = ensure_tiny_pair(model_cfg, TASK)
    assert (entry / COMPLETE).is_file() and (entry / "bootstrap.json").is_file()
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {entry.name}  # no temp dirs left

    def boom(*a, **k):
        raise AssertionError("retrained a complete entry")

    monkeypatch.setattr(bootstrap, "train_member", boom)
    assert ensure_tiny_pair(model_cfg, TASK) == entry
    pair = load_pair(model_cfg, TASK, device="cpu")
    assert pair.teacher.config.hidden_size == 16 and not pair.teacher.training
    assert pair.tokenizer.get_vocab() == build_tokenizer().get_vocab()


def test_incomplete_entry_is_rebuilt(tmp_path, monkeypatch):
    model_cfg = ModelConfig(bootstrap=TINY_BOOT, cache_dir=str(tmp_path))
    entry = entry_dir(model_cfg, TASK)
    (entry / "teacher").mkdir(parents=True)  # a half-written entry without the marker
    (entry / "teacher" / "stale").write_text("x")
    trained = []
    monkeypatch.setattr(bootstrap, "train_member", lambda role, *a: trained.append(role) or {"accuracy": {}})
    assert ensure_tiny_pair(model_cfg, TASK) == entry
    assert trained == ["teacher", "student"]
    assert (entry / COMPLETE).is_file() and not (entry / "teacher" / "stale").exists()


def test_temp_dirs_of_killed_bootstraps_are_removed(tmp_path, monkeypatch):
    model_cfg = ModelConfig(bootstrap=TINY_BOOT, cache_dir=str(tmp_path))
    entry = entry_dir(model_cfg, TASK)
    killed = tmp_path / f".{entry.name}.tmp-999999"  # a SIGKILLed bootstrap's half-trained models
    (killed / "teacher").mkdir(parents=True)
    other = tmp_path / ".other-entry.tmp-999999"  # another entry's: not ours to remove
    other.mkdir()
    monkeypatch.setattr(bootstrap, "train_member", lambda role, *a: {"accuracy": {}})
    ensure_tiny_pair(model_cfg, TASK)
    assert not killed.exists() and other.exists()


def test_failed_bootstrap_leaves_no_entry(tmp_path, monkeypatch):
    model_cfg = ModelConfig(bootstrap=TINY_BOOT, cache_dir=str(tmp_path))

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bootstrap, "train_member", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_pair(model_cfg, TASK)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_waits_for_a_concurrent_bootstrap(tmp_path, monkeypatch):
    """Another process holds the entry's lock and completes it: we wait, then load without training."""
    model_cfg = ModelConfig(bootstrap=TINY_BOOT, cache_dir=str(tmp_path))
    entry = entry_dir(model_cfg, TASK)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, pathlib
        from filelock import FileLock
        with FileLock({str(entry) + ".lock"!r}):
            print("locked", flush=True)
            time.sleep(1.0)
            pathlib.Path({str(entry)!r}).mkdir(parents=True)
            pathlib.Path({str(entry / COMPLETE)!r}).write_text("done")
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    monkeypatch.setattr(bootstrap, "train_member", lambda *a, **k: pytest.fail("trained while another did"))
    assert ensure_tiny_pair(model_cfg, TASK) == entry
    assert holder.wait(timeout=10) == 0
