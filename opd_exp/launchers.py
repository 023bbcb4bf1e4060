"""Hydra's launchers with each sweep cell's set-up guarded: Hydra creates a cell's dir, its log file and .hydra/
before our task function runs, and an error there (a cell dir that cannot be written) would end the whole sweep
(basic launcher, joblib) or the collection of its results (submitit). Guarded, it fails that cell with one line
and the launcher goes on to the other cells.

:func:`isolate_cells` (called by the entrypoint before Hydra starts) installs :func:`guarded_run_job` in the
basic launcher and :func:`guarded_execute_job` in the joblib launcher (pickled by reference to this module, so
loky workers run it too), and swaps an instantiated submitit launcher for its subclass here (Hydra instantiates
only classes of its ``hydra_plugins`` package; submitit pickles the launcher by class, so each job process
imports this module and runs the guarded ``__call__``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

_ORIGINAL: dict[str, Callable] = {}  # the functions replaced, by name


def failed_cell(overrides: Sequence[str], where: str, err: BaseException):
    """The JobReturn of a cell whose set-up failed: printed as one line, returned as a failed summary (status
    COMPLETED for Hydra, so that its sweeper goes on to the other cells)."""
    from hydra.core.utils import JobReturn, JobStatus

    text = str(err).strip().splitlines()
    cause = err.__cause__ or err.__context__
    detail = f"{type(err).__name__}: {text[-1] if text else ''}"
    if cause is not None:
        detail += f" ({type(cause).__name__}: {cause})"
    message = f"{where}: cannot set up the cell ({detail}); this cell failed, the sweep goes on"
    print(f"[opd-exp] {message}", file=sys.stderr, flush=True)
    ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    ret.return_value = {"status": "failed", "error": message}
    return ret


def guarded_run_job(task_function, config, job_dir_key, job_subdir_key, hydra_context, configure_logging=True):
    """Hydra's ``run_job`` (basic launcher), with a failed set-up of the cell dir ending that cell only."""
    from omegaconf import OmegaConf

    try:
        return _ORIGINAL["run_job"](task_function=task_function, config=config, job_dir_key=job_dir_key,
                                    job_subdir_key=job_subdir_key, hydra_context=hydra_context,
                                    configure_logging=configure_logging)
    except Exception as err:
        where = OmegaConf.select(config, "hydra.runtime.output_dir", default=None) or "sweep cell"
        return failed_cell(list(config.hydra.overrides.task), str(where), err)


def guarded_execute_job(idx: int, overrides: Sequence[str], *args):
    """The joblib launcher's per-cell function (runs in a loky worker), with a failed set-up of the cell dir
    ending that cell only. Pickled by reference to this module, so the worker runs this wrapper too."""
    from hydra_plugins.hydra_joblib_launcher import _core

    original = _ORIGINAL.get("execute_job", _core.execute_job)  # the worker imported _core unpatched
    try:
        return original(idx, overrides, *args)
    except Exception as err:
        return failed_cell(overrides, f"sweep cell #{idx} ({' '.join(overrides)})", err)


def _guarded_call(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
    """The submitit launcher's per-job ``__call__`` (in the job's process), a set-up failure failing the cell only."""
    try:
        return super(type(self), self).__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
    except Exception as err:
        return failed_cell(sweep_overrides, f"sweep cell #{job_num} ({' '.join(sweep_overrides)})", err)


class GuardedLocalLauncher(LocalLauncher):
    """submitit's local executor; a cell's set-up failure fails that cell only."""

    __call__ = _guarded_call


class GuardedSlurmLauncher(SlurmLauncher):
    """submitit on Slurm; a cell's set-up failure fails that cell only."""

    __call__ = _guarded_call


# by class name: Hydra's plugin scan re-executes the plugin's module, so its classes are not the ones imported here
GUARDED = {"LocalLauncher": GuardedLocalLauncher, "SlurmLauncher": GuardedSlurmLauncher}


def _guarded_launcher(self, *args, **kwargs):
    """Plugins.instantiate_launcher, a submitit launcher swapped for its guarded subclass."""
    launcher = _ORIGINAL["instantiate_launcher"](self, *args, **kwargs)
    if type(launcher).__module__.startswith("hydra_plugins.hydra_submitit_launcher"):
        launcher.__class__ = GUARDED.get(type(launcher).__name__, type(launcher))
    return launcher


def isolate_cells() -> None:
    """Install the guards (see the module's docstring); idempotent."""
    from hydra.core.plugins import Plugins

    Plugins.instance()  # its first call scans and re-executes the plugin modules: patch them after it
    if "instantiate_launcher" not in _ORIGINAL:
        _ORIGINAL["instantiate_launcher"] = Plugins.instantiate_launcher
        Plugins.instantiate_launcher = _guarded_launcher
    import hydra._internal.core_plugins.basic_launcher as basic

    if "run_job" not in _ORIGINAL:
        _ORIGINAL["run_job"] = basic.run_job
        basic.run_job = guarded_run_job
    try:
        from hydra_plugins.hydra_joblib_launcher import _core
    except ImportError:
        return
    if "execute_job" not in _ORIGINAL:
        _ORIGINAL["execute_job"] = _core.execute_job
        _core.execute_job = guarded_execute_job
