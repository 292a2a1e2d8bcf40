"""Train an LLM into a GRACE embedder.

python train.py                                   # embedded SmolLM2 on CPU, offline data
python train.py backbone=smollm2 reward=unsup     # unsupervised (self-anchor)
python train.py backbone=qwen reward=sup experiment=paper_sup trainer=gpu
python train.py -m reward=sup,unsup               # Hydra multirun
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
