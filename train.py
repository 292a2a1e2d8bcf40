"""Train an LLM into a GRACE embedder.

python train.py                                   # the quickstart: embedded SmolLM2, ~10 min on CPU
python train.py reward=unsup                      # the same, unsupervised (experiment=quickstart_unsup)
python train.py experiment=none reward=unsup      # the group defaults (paper settings), 4 steps
python train.py backbone=qwen reward=sup          # the paper recipe on a GPU (experiment=paper_sup)
python train.py -m backbone=qwen reward=sup,unsup   # Hydra multirun: paper_sup and paper_unsup

Without experiment=, the preset follows backbone, reward and method (docs/presets.md): the command
line is resolved here, before Hydra composes (grace_lightning/presets.py).
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from grace_lightning.data.readers import DataError
from grace_lightning.errors import ConfigError
from grace_lightning.presets import HardwareError, PresetError, resolve_overrides
from grace_lightning.train import metric_value, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = train(cfg)
    except (ConfigError, DataError, HardwareError) as e:
        # found at startup, before any model loads: one line that says what to change, no
        # traceback. In a multirun the job fails instead, so that the launcher records it and
        # runs the other jobs (each of which may be fine).
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        if isinstance(e, HardwareError):  # no GPU / not enough GPU memory
            sys.exit(str(e))
        print(f"error: {e}", file=sys.stderr)  # bad config value or bad data: as eval.py
        sys.exit(2)
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    try:
        sys.argv[1:] = resolve_overrides(sys.argv[1:])  # experiment=auto -> the preset
    except PresetError as e:
        sys.exit(f"train.py: {e}")
    main()
