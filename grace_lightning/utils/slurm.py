"""Preemption on SLURM: the signal submitit sends before the time limit saves and requeues.

hydra-submitit-launcher writes ``#SBATCH --signal=USR2@<signal_delay_s>``: SLURM sends SIGUSR2
to every task that long before the time limit (and on preemption). Lightning's
``SLURMEnvironment`` listens on SIGUSR1 unless told otherwise, so nothing was saved. Here:

- :func:`slurm_environment` (a ``trainer.plugins`` entry, conf/trainer/default.yaml) gives
  Lightning ``SLURMEnvironment(requeue_signal=SIGUSR2)`` when the process runs under SLURM
  (``srun``/submitit tasks), and nothing elsewhere. On the signal Lightning saves
  ``<run dir>/hpc_ckpt_<n>.ckpt`` on every rank and rank 0 runs ``scontrol requeue <job id>``;
  the requeued job resumes from the newest ``hpc_ckpt_*`` (Lightning does this by itself when
  ``ckpt_path`` is null; ``ckpt_path=last`` takes the newer of it and ``checkpoints/last.ckpt``).
- submitit installs its own SIGUSR2 handler (requeue without a Lightning checkpoint), and
  Lightning does not register its handler over an existing one: :func:`hand_requeue_signal_to_lightning`
  removes submitit's right before ``trainer.fit`` so Lightning's saves first.

The requeued job must find the same run dir: fix ``hydra.sweep.dir`` (the default contains
``${now:...}``), see conf/hydra/launcher/slurm.yaml.
"""

from __future__ import annotations

import logging
import signal

from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def parse_signal(name: str | int | signal.Signals) -> signal.Signals:
    """``"USR2"``, ``"SIGUSR2"``, ``12`` -> ``signal.SIGUSR2``."""
    if isinstance(name, signal.Signals):
        return name
    if isinstance(name, int):
        return signal.Signals(name)
    key = str(name).upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(f"requeue_signal={name!r}: not a signal name (e.g. USR2)") from None


def slurm_environment(
    requeue_signal: str | int = "USR2", auto_requeue: bool = True
) -> SLURMEnvironment | None:
    """``SLURMEnvironment(auto_requeue, requeue_signal)`` under SLURM, else None (dropped from
    ``trainer.plugins`` by ``grace_lightning.train.build_trainer``)."""
    sig = parse_signal(requeue_signal)
    if not SLURMEnvironment.detect():
        return None
    return SLURMEnvironment(auto_requeue=bool(auto_requeue), requeue_signal=sig)


def cluster_environment(trainer):
    """The cluster environment Lightning's signal handling looks at (also for single-device
    strategies, which have no ``strategy.cluster_environment``)."""
    connector = getattr(trainer, "_accelerator_connector", None)
    env = getattr(connector, "cluster_environment", None)
    return env if env is not None else getattr(trainer.strategy, "cluster_environment", None)


def hand_requeue_signal_to_lightning(trainer) -> bool:
    """Remove a foreign handler (submitit's) of the requeue signal so Lightning installs its own
    save-and-requeue handler in ``trainer.fit``. Returns True when one was removed."""
    env = cluster_environment(trainer)
    if not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
        return False
    sig = env.requeue_signal or signal.SIGUSR1
    current = signal.getsignal(sig)
    if current in (None, signal.SIG_DFL, signal.SIG_IGN):
        return False
    log.info(
        "SLURM: %s goes to Lightning (save hpc_ckpt + scontrol requeue) instead of %r",
        sig.name,
        current,
    )
    signal.signal(sig, signal.SIG_DFL)
    return True
