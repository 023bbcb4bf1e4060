"""The bootstrapped pair does not depend on the machine or on the cache being warm: float32 unless asked,
precision and weight hashes recorded, and the caller's RNG streams untouched by a build."""

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from opd_exp.config import ModelConfig, TaskConfig
from opd_exp.config.validation import ConfigError
from opd_exp.models import bootstrap
from opd_exp.models.bootstrap import META, cache_key, ensure_tiny_pair, parse_bootstrap

TINY_MEMBER = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "sft_steps": 2,
               "batch_size": 4, "warmup_steps": 1}
TINY_BOOT = {"teacher": TINY_MEMBER, "student": {**TINY_MEMBER, "sft_examples": 8}, "eval_examples": 4,
             "eval_max_new_tokens": 4, "progress": False}
TASK = TaskConfig(n_train=40, n_eval=4, eval_splits={"id": {}})


def rng_states() -> tuple:
    np_state = np.random.get_state()
    return torch.get_rng_state(), random.getstate(), (np_state[0], np_state[1].copy(), *np_state[2:])


def assert_same_rng(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]), "torch's global RNG moved"
    assert a[1] == b[1], "python's random moved"
    assert a[2][0] == b[2][0] and np.array_equal(a[2][1], b[2][1]) and a[2][2:] == b[2][2:], "numpy's RNG moved"


def test_bf16_is_opt_in_and_keyed():
    assert parse_bootstrap({}).bf16 is False
    with pytest.raises(ConfigError, match=r"model\.bootstrap\.bf16: got 'auto', allowed values: false .* true"):
        parse_bootstrap({"bf16": "auto"})
    with pytest.raises(ConfigError, match=r"model\.bootstrap\.bf16: got 1, expected true or false"):
        parse_bootstrap({"bf16": 1})
    model_cfg = ModelConfig(bootstrap=TINY_BOOT)
    fp32 = cache_key(model_cfg, TASK, parse_bootstrap(TINY_BOOT))
    assert cache_key(model_cfg, TASK, parse_bootstrap({**TINY_BOOT, "bf16": True})) != fp32
    assert bootstrap.precision(parse_bootstrap(TINY_BOOT)) == "float32"


def test_build_on_empty_cache_leaves_rng_untouched_and_records_precision(tmp_path):
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    torch.rand(3), random.random(), np.random.rand()  # states mid-stream, not fresh seeds
    before = rng_states()
    entry = ensure_tiny_pair(ModelConfig(bootstrap=TINY_BOOT, cache_dir=str(tmp_path)), TASK)
    assert_same_rng(before, rng_states())

    meta = json.loads((entry / META).read_text())
    assert meta["precision"] == "float32"
    for role in ("teacher", "student"):
        weights = (entry / role / "model.safetensors").read_bytes()
        assert meta[role]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert meta["teacher"]["weights_sha256"] != meta["student"]["weights_sha256"]
