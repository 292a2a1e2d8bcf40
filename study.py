"""The paper's comparison (Tables 1-2) at small scale: train, evaluate, report (conf/study.yaml).

python study.py                      # run or resume every stage, then write docs/study/ + README
python study.py report_only=true     # just the report, from the stages that have finished
python study.py only=[base,reasoning] dry_run=true   # print the commands of these rows
"""

import hydra
from omegaconf import DictConfig

from grace_lightning.study.stages import run_study


@hydra.main(version_base="1.3", config_name="study", config_path="conf")
def main(cfg: DictConfig) -> None:
    run_study(cfg)


if __name__ == "__main__":
    main()
