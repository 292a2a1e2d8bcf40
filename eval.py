"""Evaluate a GRACE model on MTEB and print the paper's table.

python eval.py model=smollm2 eval=local mode=base          # embedded default, offline, Base row
python eval.py model=smollm2 eval=local mode=rationale     # "w/ reasoning"
python eval.py model=outputs/train/runs/<run> eval=local   # a trained run (its export/)
python eval.py model=qwen eval=paper mode=rationale        # the paper's 56 tasks (Hub, GPU)
"""

import hydra
from omegaconf import DictConfig

from grace_lightning.eval.run import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return evaluate(cfg)["avg"]


if __name__ == "__main__":
    main()
