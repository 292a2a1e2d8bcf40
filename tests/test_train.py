"""Config composition and tiny end-to-end training runs (lightning-hydra-template style)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from grace_lightning.config import ConfigError, validate
from grace_lightning.train import train

from .conftest import DATA_ROOT, ROOT

CONF = str(ROOT / "conf")
HUB_BACKBONES = {
    "qwen": "Qwen/Qwen2.5-1.5B-Instruct",
    "llama": "meta-llama/Llama-3.2-3B-Instruct",
    "qwen3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen3": "Qwen/Qwen3-4B-Instruct-2507",
}


def make_cfg(overrides: list[str], out_dir: Path | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if out_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
            cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig().set_config(cfg)  # resolves ${hydra:...} as a real run would
    return cfg


TINY = [
    "backbone=tiny",
    "data=shared",
    f"data.root={DATA_ROOT}",
    "data.max_examples=64",
    "data.prompts_per_step=2",
    "algo.prompts_per_minibatch=1",
    "rollout.num_generations=3",
    "rollout.max_new_tokens=6",
    "prompt.max_prompt_tokens=96",
    "optim.lr=1e-3",
    "optim.weight_decay=0",  # parameters must move by the policy gradient alone
    "reward.truncation=off",  # a random tiny model never stops; keep the reward signal
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


@pytest.mark.parametrize("backbone", ["smollm2", "tiny", *HUB_BACKBONES])
@pytest.mark.parametrize("reward", ["sup", "unsup"])
@pytest.mark.parametrize("experiment", [None, "paper_sup", "paper_unsup"])
def test_every_backbone_reward_experiment_composes(backbone, reward, experiment, tmp_path):
    overrides = [f"backbone={backbone}", f"reward={reward}"]
    if experiment:
        overrides.append(f"experiment={experiment}")
    cfg = make_cfg(overrides, tmp_path)
    validate(cfg)
    assert cfg.model.backbone.name == backbone
    if backbone in HUB_BACKBONES:
        assert cfg.backbone.source == "hub"
        assert cfg.backbone.pretrained == HUB_BACKBONES[backbone]
        assert cfg.backbone.dtype == "bfloat16"
    else:
        assert cfg.backbone.dtype == "float32"
    if experiment:  # upstream train.sh values
        assert cfg.rollout.num_generations == 8
        assert cfg.rollout.max_new_tokens == 2048
        assert cfg.data.prompts_per_step == 64
        assert cfg.algo.prompts_per_minibatch == 16
        assert cfg.optim.lr == 1e-6
        assert cfg.reward.tau == 0.1
        assert cfg.reward.lambda_consistency == cfg.reward.lambda_hard == 0.2
        assert cfg.trainer.max_epochs == 2
    assert cfg.reward.mode == reward  # the command line's reward= wins over the experiment's
    assert cfg.data.mode == cfg.reward.mode


def test_default_config_is_embedded_model_on_cpu(tmp_path):
    cfg = make_cfg([], tmp_path)
    assert cfg.backbone.name == "smollm2" and cfg.trainer.accelerator == "cpu"
    assert cfg.reward.mode == "sup"


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.prompts_per_minibatch=3", "not a multiple"),
        ("rollout.num_generations=1", "K >= 2"),
        ("reward.tau=0", "tau"),
        ("algo.loss_type=foo", "loss_type"),
    ],
)
def test_bad_sizes_fail_at_startup_with_what_to_change(override, message, tmp_path):
    cfg = make_cfg(["data.prompts_per_step=4", "algo.prompts_per_minibatch=2", override], tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


@pytest.mark.parametrize("reward", ["sup", "unsup"])
def test_tiny_training_run_end_to_end(reward, tmp_path):
    cfg = make_cfg([*TINY, f"reward={reward}"], tmp_path)
    _, objects = train(cfg)
    model = objects["model"]
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    fresh, _ = load_backbone(BackboneConfig(**cfg.backbone))
    changed = [
        n
        for (n, p), (_, q) in zip(model.policy.named_parameters(), fresh.named_parameters())
        if not torch.equal(p.detach().cpu(), q)
    ]
    assert len(changed) == len(list(fresh.parameters())), "every parameter should have moved"

    metrics = (tmp_path / "csv").rglob("metrics.csv")
    header = next(metrics).read_text().splitlines()[0].split(",")
    for name in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "loss",
        "entropy",
        "clip_ratio/region_mean",
        "time/rollout",
        "time/update",
        "lr-AdamW",
    ]:
        assert name in header, name
    terms = (
        ["pos", "neg", "consistency", "hard"]
        if reward == "sup"
        else ["self", "consistency", "hard"]
    )
    for t in terms:
        for stat in ("mean", "std", "group_std"):  # TRL's rewards/<name>/mean and /std
            assert f"rewards/{t}/{stat}" in header, (t, stat)

    table = [json.loads(x) for x in (tmp_path / "rationales.jsonl").read_text().splitlines()]
    assert table and {"step", "text", "rationale", "reward", "advantage"} <= set(table[0])
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()

    export = tmp_path / "export"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = reloaded.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    meta = json.loads((export / "grace_config.json").read_text())
    assert meta["system_prompt"] == cfg.prompt.system_prompt
    for (_, p), (_, q) in zip(model.policy.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p.detach().cpu(), q)


def test_nonfinite_reward_skips_the_update(tmp_path, monkeypatch):
    from grace_lightning import module as module_mod

    real = module_mod.reward_fns.supervised_rewards

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        terms["total"] = terms["total"].clone()
        terms["total"][0, 0] = float("nan")
        return terms

    monkeypatch.setattr(module_mod.reward_fns, "supervised_rewards", poisoned)
    cfg = make_cfg(
        [
            *TINY,
            "reward=sup",
            "reward.truncation=off",
            "trainer.max_steps=1",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=1",
            "callbacks=none",
        ],
        tmp_path,
    )
    _, objects = train(cfg)
    model = objects["model"]
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    fresh, _ = load_backbone(BackboneConfig(**cfg.backbone))
    for p, q in zip(model.policy.parameters(), fresh.parameters()):
        assert torch.equal(p.detach().cpu(), q), "a NaN reward must not reach the optimiser"
    header = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "update_skipped" in header


@pytest.mark.parametrize("experiment, mode", [("paper_sup", "sup"), ("paper_unsup", "unsup")])
def test_experiment_alone_selects_its_reward(experiment, mode, tmp_path):
    cfg = make_cfg([f"experiment={experiment}"], tmp_path)
    assert cfg.reward.mode == mode and cfg.data.mode == mode
    if mode == "unsup":
        assert cfg.reward.cross_group == "paper"


def test_lora_run_trains_adapters_only_and_exports_merged_and_adapter(tmp_path):
    cfg = make_cfg(
        [*TINY, "reward=sup", "peft=lora", "algo.beta=0.1", "trainer.max_steps=1"], tmp_path
    )
    _, objects = train(cfg)
    policy = objects["model"].policy
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    b_weights = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in b_weights), "LoRA B starts at zero; a step must move it"
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").exists()
    base = objects["model"].policy.get_base_model()
    # merged q_proj = base + B A * scale: differs from the un-merged base weights
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    q_base = base.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(q_merged, q_base)
    header = next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "kl" in header.split(",")


@pytest.mark.parametrize(
    "algo",
    [
        ["algo.advantage=rloo"],
        ["algo.advantage=reinforce_pp", "algo.loss_type=grpo"],
        ["algo.advantage=remax", "algo.loss_type=bnpo"],
        ["algo.dynamic_sampling=true", "algo.epsilon_high=0.28", "algo.loss_type=dapo"],
        ["algo.loss_type=dr_grpo", "algo.num_iterations=2"],
    ],
    ids=["rloo", "reinforce_pp", "remax", "dapo", "dr_grpo"],
)
def test_each_algorithm_trains_two_steps(algo, tmp_path):
    cfg = make_cfg([*TINY, "reward=unsup", "callbacks=none", *algo], tmp_path)
    _, objects = train(cfg)
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    fresh, _ = load_backbone(BackboneConfig(**cfg.backbone))
    moved = sum(
        not torch.equal(p.detach().cpu(), q)
        for p, q in zip(objects["model"].policy.parameters(), fresh.parameters())
    )
    assert moved == len(list(fresh.parameters()))


def test_bad_data_fails_before_any_model_loads(tmp_path, monkeypatch):
    from grace_lightning import module as module_mod
    from grace_lightning.data.readers import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"anchor": "a", "positive": "b", "hard_negative": "c"}\n{"anchor": "q", "positive": ""}\n'
    )

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was validated")

    monkeypatch.setattr(module_mod, "load_backbone", no_model)
    cfg = make_cfg([*TINY, "reward=sup", f"data.sup.path={bad}"], tmp_path)
    with pytest.raises(DataError, match=r"bad.jsonl:2: field '(positive|hard_negative)'"):
        train(cfg)


def test_validation_reward_is_logged(tmp_path):
    cfg = make_cfg(
        [
            *TINY,
            "reward=unsup",
            "trainer.max_steps=1",
            "callbacks=none",
            "data.val_fraction=0.1",
            "trainer.limit_val_batches=1",
            "+trainer.val_check_interval=1",
        ],
        tmp_path,
    )
    metrics, _ = train(cfg)
    assert "val/reward" in metrics and "val/rewards/self/mean" in metrics
