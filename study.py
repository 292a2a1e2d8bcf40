"""Study v2 (conf/study.yaml): GRACE vs contrastive fine-tuning at small scale, with intervals.

python study.py                      # run or resume every stage, then write docs/study/ + README
python study.py report_only=true     # just the report, from the stages that have finished
python study.py only=[two_stage]     # one row (and the infonce row it starts from)
python study.py dry_run=true         # print the budget and every stage's command, run nothing
python study.py --config-name study_v1   # the first study (v1 rows, eval.py, no intervals)
python study.py --config-name study_v3   # v3: equal budgets, 3 seeds, ablation arms (docs/study/v3.md)
"""

import hydra
from omegaconf import DictConfig

from grace_lightning.study.stages import run_study


@hydra.main(version_base="1.3", config_name="study", config_path="conf")
def main(cfg: DictConfig) -> None:
    from grace_lightning.config import require_extra

    require_extra("matplotlib", "python study.py (its report's plots)")  # before hours of stages
    run_study(cfg)


if __name__ == "__main__":
    main()
