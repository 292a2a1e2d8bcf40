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


def make_cfg(overrides: list[str], out_dir: Path | None = None, preset: str = "none"):
    """train.yaml composed with ``overrides``; ``preset``: the experiment the overrides start
    from (``none`` = the group defaults, not `python train.py`'s quickstart; a later
    ``experiment=...`` in ``overrides`` wins)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"experiment={preset}", *overrides], return_hydra_config=True
        )
    if out_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
            cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig().set_config(cfg)  # resolves ${hydra:...} as a real run would
    return cfg


TINY = [
    "experiment=none",  # the group defaults (subprocess runs do not go through make_cfg)
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
    from grace_lightning.rl import rewards as reward_fns

    real = reward_fns.similarity_term  # reward.terms.pos's _target_, resolved when the run starts

    def poisoned(rollouts, anchor):  # the inputs it names are the ones it gets
        term = real(rollouts, anchor).clone()
        term[0, 0] = float("nan")
        return term

    monkeypatch.setattr(reward_fns, "similarity_term", poisoned)
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


TRL_METRICS = [  # TRL GRPOTrainer's names (reward functions = our reward terms)
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "completions/min_terminated_length",
    "completions/max_terminated_length",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_mean",
    "clip_ratio/high_max",
    "clip_ratio/region_mean",
    "num_tokens",
    "grad_norm",
    "rewards/pos/mean",
    "rewards/pos/std",
]


def test_metrics_have_trl_names_and_counters(tmp_path):
    cfg = make_cfg([*TINY, "reward=sup", "callbacks=none", "algo.micro_batch_size=2"], tmp_path)
    train(cfg)
    rows = metric_rows(tmp_path)
    header = set(rows[0])
    for name in [*TRL_METRICS, "update_skipped", "skipped_steps", "rewards/pos/group_std"]:
        assert name in header, name
    assert not any(n.endswith("_group_std") for n in header), "old name rewards/<term>_group_std"
    logged = [r for r in rows if r.get("num_tokens")]
    assert float(logged[-1]["skipped_steps"]) == 0.0
    tokens = [float(r["num_tokens"]) for r in logged]
    assert tokens == sorted(tokens) and tokens[0] > 0  # cumulative, as TRL


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    path = next((run_dir / "csv").rglob("metrics.csv"))
    return list(csv.DictReader(path.read_text().splitlines()))


def test_nonfinite_gradient_skips_optimiser_steps_but_counts_them(tmp_path, monkeypatch):
    """A NaN gradient: no weight or optimiser-state change, the steps still count (global_step,
    seeds, checkpoint cadence) and are logged as update_skipped / skipped_steps."""
    from grace_lightning.rl import update as update_mod

    real = update_mod.clipped_policy_loss

    def poisoned(*args, **kwargs):
        loss, m = real(*args, **kwargs)
        return loss * float("nan"), m

    monkeypatch.setattr(update_mod, "clipped_policy_loss", poisoned)
    cfg = make_cfg([*TINY, "reward=sup", "callbacks=none", "trainer.max_steps=2"], tmp_path)
    _, objects = train(cfg)  # 2 prompts, 1 per mini-batch: 2 optimiser steps, both skipped
    model, trainer = objects["model"], objects["trainer"]
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    fresh, _ = load_backbone(BackboneConfig(**cfg.backbone))
    for (n, p), q in zip(model.policy.named_parameters(), fresh.parameters()):
        assert torch.equal(p.detach().cpu(), q), n
    assert trainer.global_step == 2 and model.skipped_steps == 2
    assert not trainer.optimizers[0].state, "a skipped step must not create optimiser state"
    row = [r for r in metric_rows(tmp_path) if r.get("update_skipped")][-1]
    assert float(row["update_skipped"]) == 2.0 and float(row["skipped_steps"]) == 2.0


def test_bf16_mixed_on_cpu_keeps_rewards_advantages_and_weights_fp32(tmp_path, monkeypatch):
    from grace_lightning.module import GraceModule
    from grace_lightning.rl import update as update_mod

    seen: dict[str, set] = {"terms": set(), "advantages": set(), "loss": set(), "autocast": set()}
    real_rewards, real_update = GraceModule.compute_rewards, GraceModule.update
    real_loss = update_mod.clipped_policy_loss

    def spy_rewards(self, policy_emb, anchors):
        terms = real_rewards(self, policy_emb, anchors)
        seen["terms"] |= {t.dtype for t in terms.values()}
        return terms

    def spy_update(self, ro, advantages, loss_weight):
        seen["advantages"].add(advantages.dtype)
        seen["autocast"].add(torch.is_autocast_enabled("cpu"))  # bf16-mixed really is on
        return real_update(self, ro, advantages, loss_weight)

    def spy_loss(*args, **kwargs):
        loss, m = real_loss(*args, **kwargs)
        seen["loss"].add(loss.dtype)
        return loss, m

    monkeypatch.setattr(GraceModule, "compute_rewards", spy_rewards)
    monkeypatch.setattr(GraceModule, "update", spy_update)
    monkeypatch.setattr(update_mod, "clipped_policy_loss", spy_loss)
    cfg = make_cfg(
        [*TINY, "reward=sup", "callbacks=none", "trainer.precision=bf16-mixed", "algo.beta=0.1"],
        tmp_path,
    )
    _, objects = train(cfg)
    assert seen["autocast"] == {True}
    assert seen["terms"] == seen["advantages"] == seen["loss"] == {torch.float32}, seen
    params = list(objects["model"].policy.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert objects["trainer"].global_step == 2


def test_remax_trains_on_grpo_rewards_with_the_greedy_rollout_as_baseline_only(
    tmp_path, monkeypatch
):
    from grace_lightning.module import GraceModule
    from grace_lightning.rl.rewards import supervised_rewards

    calls, adv_calls = [], []
    real_rewards, real_adv = GraceModule.compute_rewards, GraceModule.compute_advantages

    def spy_rewards(self, policy_emb, anchors):
        terms = real_rewards(self, policy_emb, anchors)
        calls.append((policy_emb.clone(), dict(anchors), terms))
        return terms

    def spy_adv(self, rewards, baseline=None, token_counts=None):
        adv_calls.append((rewards.clone(), baseline))
        return real_adv(self, rewards, baseline, token_counts)

    monkeypatch.setattr(GraceModule, "compute_rewards", spy_rewards)
    monkeypatch.setattr(GraceModule, "compute_advantages", spy_adv)
    cfg = make_cfg(
        [*TINY, "reward=sup", "callbacks=none", "algo=remax", "trainer.max_steps=2"], tmp_path
    )
    train(cfg)
    k = cfg.rollout.num_generations
    (emb, anchors, terms), (emb_g, _, terms_g) = calls[:2]  # sampled; sampled + greedy
    assert emb.shape[1] == k and emb_g.shape[1] == k + 1
    assert torch.equal(emb_g[:, :k], emb) and torch.equal(emb_g[:, k], anchors["greedy"].float())
    r = cfg.reward
    kw = dict(lambda_consistency=r.lambda_consistency, lambda_hard=r.lambda_hard, tau=r.tau)
    kw.update(negative_mode=r.get("negative_mode", "paper"), hard_mode=r.get("hard_mode", "paper"))
    grpo = supervised_rewards(anchors["query"], emb, anchors["negatives"], **kw)
    for name, t in grpo.items():  # the K sampled rollouts get exactly GRPO's terms
        torch.testing.assert_close(terms[name], t, msg=name)
    rewards, baseline = adv_calls[0]
    torch.testing.assert_close(rewards, grpo["total"])  # truncation=off in TINY
    with_greedy = supervised_rewards(anchors["query"], emb_g, anchors["negatives"], **kw)
    torch.testing.assert_close(baseline, with_greedy["total"][:, k])
    # the greedy rollout changes its group's statistics if it is put inside the group: the test
    # could tell the two designs apart
    assert not torch.allclose(with_greedy["consistency"][:, :k], grpo["consistency"])
