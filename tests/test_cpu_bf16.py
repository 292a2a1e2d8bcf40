"""``trainer=cpu_bf16``: a tiny run under bf16 autocast on the CPU trains, with fp32 master
weights and fp32 rewards / advantages (the arithmetic the issue requires to stay fp32)."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from grace_lightning.module import GraceModule
from grace_lightning.train import train

from .conftest import DATA_ROOT, ROOT

OVERRIDES = [
    "experiment=none",  # the group defaults, not the quickstart job
    "trainer=cpu_bf16",
    "backbone=tiny",
    "data=shared",
    f"data.root={DATA_ROOT}",
    "data.max_examples=16",
    "data.prompts_per_step=2",
    "algo.prompts_per_minibatch=2",
    "rollout.num_generations=3",
    "rollout.max_new_tokens=4",
    "prompt.max_prompt_tokens=96",
    "optim.lr=1e-3",
    "optim.weight_decay=0",
    "reward.truncation=off",
    "trainer.max_steps=1",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
]


def test_cpu_bf16_trains_with_fp32_weights_and_rewards(tmp_path, monkeypatch):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=OVERRIDES, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig().set_config(cfg)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "cpu"

    seen: dict = {}
    rollout, rewards, advantages = (
        GraceModule.rollout,
        GraceModule.compute_rewards,
        GraceModule.compute_advantages,
    )

    def spy_rollout(self, batch):
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        seen["autocast_dtype"] = torch.get_autocast_dtype("cpu")
        seen["before"] = {n: p.detach().clone() for n, p in self.policy.named_parameters()}
        seen["module"] = self
        return rollout(self, batch)

    def spy_rewards(self, *a, **kw):
        out = rewards(self, *a, **kw)
        seen["reward_dtypes"] = {k: v.dtype for k, v in out.items()}
        return out

    def spy_advantages(self, *a, **kw):
        out = advantages(self, *a, **kw)
        seen["advantage_dtype"] = out.dtype
        return out

    monkeypatch.setattr(GraceModule, "rollout", spy_rollout)
    monkeypatch.setattr(GraceModule, "compute_rewards", spy_rewards)
    monkeypatch.setattr(GraceModule, "compute_advantages", spy_advantages)
    train(cfg)

    assert seen["autocast"] and seen["autocast_dtype"] == torch.bfloat16  # the rollout too
    assert set(seen["reward_dtypes"].values()) == {torch.float32}, seen["reward_dtypes"]
    assert seen["advantage_dtype"] == torch.float32
    policy = seen["module"].policy
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # master weights
    moved = [
        n for n, p in policy.named_parameters() if not torch.equal(p.detach(), seen["before"][n])
    ]
    assert moved, "no parameter changed: the bf16 step did not train"
