"""Evaluate a GRACE model on MTEB and print the paper's table.

python eval.py model=smollm2 eval=local mode=base          # embedded default, offline, Base row
python eval.py model=smollm2 eval=local mode=rationale     # "w/ reasoning"
python eval.py model=outputs/train/runs/<run> eval=local   # a trained run (its export/)
python eval.py model=outputs/train/runs/<run>/checkpoints/last.ckpt eval=local  # any checkpoint
python eval.py model=qwen eval=paper mode=rationale        # the paper's 56 tasks (Hub, GPU)
"""

import sys

import hydra
from omegaconf import DictConfig

from grace_lightning.eval.encoder import HubUnavailableError
from grace_lightning.eval.run import HubDataError, evaluate
from grace_lightning.eval.rundir import RunDirError


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    try:
        return evaluate(cfg)["avg"]
    except (RunDirError, HubUnavailableError, HubDataError) as e:  # bad input: one clear line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
