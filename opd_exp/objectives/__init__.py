"""The distillation objectives of arXiv 2603.25562 over a :class:`LogitsHead` and a :class:`Batch`.

Importing this package fills :data:`ESTIMATORS` (see :mod:`opd_exp.objectives.base` for the interface):

- :mod:`~opd_exp.objectives.score_function`: ``sampled_token``, ``seq_rkl`` (reward-to-go + PPO surrogate)
- :mod:`~opd_exp.objectives.full`: ``full_rkl``, ``forward_kl``, ``jsd`` (exact, chunked, analytic gradient)
- :mod:`~opd_exp.objectives.topk`: ``topk_rkl`` (LSM and its support variants V1-V5)
- :mod:`~opd_exp.objectives.seq_kd`: ``seq_kd`` (SFT on teacher rollouts)

The chunked kernels they share are in :mod:`~opd_exp.objectives.kernels`; loss masks in
:mod:`~opd_exp.objectives.masks`.
"""

from opd_exp.objectives import full, score_function, seq_kd, topk  # noqa: F401  (register the estimators)
from opd_exp.objectives.base import ESTIMATORS, EstimatorSpec, LossOutput, Needs
from opd_exp.objectives.batch import Batch, TeacherScores
from opd_exp.objectives.head import LogitsHead

__all__ = ["ESTIMATORS", "Batch", "EstimatorSpec", "LogitsHead", "LossOutput", "Needs", "TeacherScores"]
