"""Train an LLM into a GRACE embedder.

python train.py                                   # the quickstart: embedded SmolLM2, ~10 min on CPU
python train.py experiment=quickstart_unsup       # the same, unsupervised (self-anchor)
python train.py experiment=none reward=unsup      # the group defaults (paper settings), 4 steps
python train.py backbone=qwen reward=sup experiment=paper_sup trainer=gpu
python train.py -m experiment=paper_sup,paper_unsup backbone=qwen trainer=gpu   # Hydra multirun
"""

import hydra
from omegaconf import DictConfig

from grace_lightning.train import metric_value, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
