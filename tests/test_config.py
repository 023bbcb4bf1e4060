import dataclasses
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd_exp.config import RunConfig, load_run_config
from opd_exp.config.validation import ConfigError


def test_defaults_validate():
    cfg = load_run_config({"train": {"mini_batch_size": 16}})
    assert isinstance(cfg, RunConfig) and cfg.train.mini_batch_size == 16


def test_dataclass_defaults_equal_the_composed_default_yaml():
    """One source of defaults: RunConfig() is exactly what a bare `opd-exp` composes from conf/ (its default
    groups included), so Python callers and the CLI cannot drift apart (mini-batch, eval batch, estimator, top-p
    once did)."""
    import dataclasses

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from opd_exp.models.bootstrap import parse_bootstrap

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        node = compose("config")
    plain = OmegaConf.to_container(node, resolve=False)
    plain.pop("hydra", None)
    plain["model"]["cache_dir"] = RunConfig().model.cache_dir  # an env interpolation in YAML
    composed, default = load_run_config(plain), RunConfig()
    # model.bootstrap is a free-form mapping: compare what it parses to
    assert parse_bootstrap(composed.model.bootstrap) == parse_bootstrap(default.model.bootstrap)
    composed.model.bootstrap = default.model.bootstrap = {}
    assert dataclasses.asdict(composed) == dataclasses.asdict(default)


@pytest.mark.parametrize("node, field, words", [
    ({"sampling": {"top_p": 0.0}}, "sampling.top_p", ["0.0", "> 0.0", "<= 1.0"]),
    ({"sampling": {"top_p": 1.5}}, "sampling.top_p", ["1.5"]),
    ({"estimator": {"top_k": 0}}, "estimator.top_k", [">= 1"]),
    ({"train": {"lr": -1e-3}}, "train.lr", ["-0.001", "> 0.0"]),
    ({"estimator": {"name": "topk"}}, "estimator.name", ["'topk'", "topk_rkl", "sampled_token"]),
    ({"train": {"lrr": 1.0}}, "train.lrr", ["did you mean 'lr'"]),
    ({"trian": {}}, "trian", ["did you mean 'train'"]),
    ({"train": {"steps": "ten"}}, "train.steps", ["integer"]),
    ({"mask": {"enabled": "yes"}}, "mask.enabled", ["true or false"]),
    ({"task": {"min_ops": 5, "max_ops": 2}}, "task.min_ops", ["max_ops"]),
    ({"train": {"mini_batch_size": 7}}, "train.mini_batch_size", ["divide"]),
])
def test_bad_values_name_field_value_and_allowed(node, field, words):
    with pytest.raises(ConfigError) as err:
        load_run_config(node)
    assert err.value.field == field
    for word in words:
        assert word in str(err.value)


def _leaf_paths(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _leaf_paths(tp, path + ".")
        else:
            yield path, tp, f.metadata


LEAVES = list(_leaf_paths(RunConfig))
junk = st.one_of(st.text(max_size=5), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.booleans(),
                 st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                 max_size=2))


def _nest(path: str, value):
    node: dict = {}
    cur = node
    parts = path.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return node


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(leaf=st.sampled_from(LEAVES), value=junk, extra_key=st.text(min_size=1, max_size=8))
def test_random_invalid_configs_give_a_clean_error_naming_a_field(leaf, value, extra_key):
    """Whatever is thrown at the validator, it either accepts or raises ConfigError naming a real field."""
    path, _, _ = leaf
    for node in (_nest(path, value), _nest(path.rsplit(".", 1)[0] + "." + extra_key if "." in path else extra_key,
                                           value)):
        try:
            load_run_config(node)
        except ConfigError as err:
            assert err.field and str(err).startswith(f"config error: {err.field}:")
            top = err.field.split(".")[0].split("[")[0]
            assert top in {f.name for f in dataclasses.fields(RunConfig)} or "unknown key" in str(err)
