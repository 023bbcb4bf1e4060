"""The run's configuration: one typed dataclass per Hydra group (schema.py), validated at start-up
(validation.py). ``conf/config.yaml`` holds the defaults; the dataclasses hold the types, ranges and docs."""

from opd_exp.config.schema import (
    EstimatorConfig,
    EvalConfig,
    MaskConfig,
    ModelConfig,
    RunConfig,
    SamplingConfig,
    TaskConfig,
    TrainConfig,
    load_run_config,
)
from opd_exp.config.validation import ConfigError

__all__ = ["ConfigError", "EstimatorConfig", "EvalConfig", "MaskConfig", "ModelConfig", "RunConfig",
           "SamplingConfig", "TaskConfig", "TrainConfig", "load_run_config"]
