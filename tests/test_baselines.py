"""The contrastive baselines (method=infonce, method=simcse): configs, loss, dropout, and 2-step
runs on the tiny model that move every parameter by the gradient alone."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from grace_lightning.config import ConfigError, validate
from grace_lightning.contrastive import enable_dropout, info_nce, lr_factor
from grace_lightning.models.backbone import BackboneConfig, load_backbone
from grace_lightning.train import train

from .test_train import TINY, make_cfg

METHODS = {"infonce": "sup", "simcse": "unsup"}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("experiment", [None, "paper"])
def test_method_configs_compose_with_their_data(method, experiment, tmp_path):
    overrides = (
        [f"experiment=paper_{method}", "backbone=qwen"] if experiment else [f"method={method}"]
    )
    cfg = make_cfg(overrides, tmp_path)
    validate(cfg)
    m = cfg.model
    assert m._target_ == "grace_lightning.contrastive.ContrastiveModule"
    assert m.objective == method and cfg.data.mode == m.data_mode == METHODS[method]
    assert m.tau == 0.05 and cfg.optim.weight_decay == 0.0  # SimCSE
    assert cfg.optim.lr == (5e-5 if method == "infonce" else 3e-5)
    assert cfg.optimized_metric == "train/acc"
    if experiment:  # paper scale: paper data, GPU, SimCSE's epochs
        assert cfg.hydra.runtime.choices.data == "paper" and cfg.trainer.accelerator == "gpu"
        assert cfg.trainer.max_epochs == (3 if method == "infonce" else 1)
        assert cfg.backbone.pretrained == "Qwen/Qwen2.5-1.5B-Instruct"
    dropout = (0.3, None) if method == "simcse" else (None, None)
    assert (m.dropout.attention, m.dropout.hidden) == dropout


@pytest.mark.parametrize("method, wrong", [("infonce", "unsup"), ("simcse", "sup")])
def test_wrong_data_for_a_method_fails_at_startup(method, wrong, tmp_path):
    cfg = make_cfg([*TINY, f"method={method}", f"reward={wrong}"], tmp_path)
    with pytest.raises(ConfigError, match=f"method={method} trains on {METHODS[method]} data"):
        validate(cfg)
    with pytest.raises(Exception, match=f"method={method} trains on"):  # and in the module
        instantiate(cfg.model, _convert_="all")


def test_info_nce_counts_in_batch_and_hard_negatives():
    torch.manual_seed(0)
    q = torch.randn(4, 8)  # (B, D)
    loss, acc = info_nce(q, q.clone(), tau=0.05)  # every positive is its query
    assert acc == 1.0 and loss < 0.05
    hard = q.clone()  # hard negatives identical to the queries: as close as the positives
    loss_hard, _ = info_nce(q, torch.cat([q, hard]), tau=0.05)  # candidates (2B, D)
    assert loss_hard > 0.69  # >= log 2: each query now has two equally good candidates
    swapped = torch.cat([q[1:], q[:1]])  # the positives of other queries
    _, acc = info_nce(q, swapped, tau=0.05)
    assert acc == 0.0


def test_lr_schedule_decays_linearly_to_zero():
    f = lr_factor("linear", warmup_steps=0, total_steps=4)
    assert [f(s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    f = lr_factor("linear", warmup_steps=2, total_steps=6)
    assert [f(s) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_factor("constant", 0, 4)(3) == 1.0


def test_lr_schedule_ends_with_the_wall_time_budget():
    """Under ``trainer.max_time`` the linear decay follows the budget's remaining fraction when
    that is smaller than the step-based one (a slow machine reaches lr 0 at the budget's end),
    and the step count when that binds first (a fast machine)."""
    left = [1.0]
    f = lr_factor("linear", 0, float("inf"), lambda: left[0])  # no max_steps: time alone
    left[0] = 0.3
    assert f(5) == pytest.approx(0.3)
    left[0] = -0.1  # past the budget (the last step's scheduler call): clamped
    assert f(6) == 0.0
    f = lr_factor("linear", 0, 10, lambda: 0.9)  # steps bind: 10% of the budget, half the steps
    assert f(5) == pytest.approx(0.5)
    f = lr_factor("linear", 0, 10, lambda: 0.2)  # time binds
    assert f(1) == pytest.approx(0.2)
    assert lr_factor("linear", 0, 10, lambda: None)(5) == 0.5  # no Timer: steps only
    assert lr_factor("constant", 0, 10, lambda: 0.1)(5) == 1.0


def test_contrastive_lr_follows_the_timer(monkeypatch):
    """``ContrastiveModule._budget_left`` reads Lightning's Timer (whose elapsed time a resume
    restores): the lr its scheduler sets is the base lr x the budget left."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from grace_lightning.contrastive import ContrastiveModule

    timer = Timer(duration={"minutes": 10})
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": 450.0)  # 7.5 of 10 min
    module = ContrastiveModule.__new__(ContrastiveModule)
    fake = SimpleNamespace(callbacks=[timer])
    monkeypatch.setattr(ContrastiveModule, "trainer", property(lambda self: fake))
    assert module._budget_left() == pytest.approx(0.25)
    fake.callbacks = []
    assert module._budget_left() is None


def test_dropout_makes_two_encodings_of_the_same_text_differ():
    model, _ = load_backbone(BackboneConfig(name="tiny", source="tiny"))
    ids = torch.randint(0, 1000, (2, 12))

    def hidden():
        return model.get_decoder()(input_ids=ids).last_hidden_state

    model.train()
    assert torch.equal(hidden(), hidden()), "Llama ships with dropout 0: SimCSE needs it added"
    assert enable_dropout(model, attention=0.1, hidden=0.1) > 0
    assert not torch.equal(hidden(), hidden())
    model.eval()
    assert torch.equal(hidden(), hidden()), "no dropout in eval mode (the export is clean)"
    assert model.config.attention_dropout == 0.0


def _moved(model, cfg) -> list[bool]:
    fresh, _ = load_backbone(BackboneConfig(**cfg.backbone))
    return [
        not torch.equal(p.detach().cpu(), q)
        for p, q in zip(model.policy.parameters(), fresh.parameters())
    ]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_two_steps_and_moves_every_parameter(method, tmp_path):
    overrides = [*TINY, f"method={method}", "data.prompts_per_step=4"]
    if method == "infonce":  # end with an evaluation: mode=auto picks base (no rationale)
        overrides += [
            "eval=local",
            "eval.max_samples=16",
            "callbacks.final_eval.tasks=[LocalSTS12]",
        ]
    cfg = make_cfg(overrides, tmp_path)
    assert cfg.optim.weight_decay == 0 and cfg.optim.lr == 1e-3  # the gradient alone moves them
    metrics, objects = train(cfg)
    moved = _moved(objects["model"], cfg)
    assert all(moved), f"{moved.count(False)} of {len(moved)} parameters did not move"

    assert {"loss", "train/acc", "lr"} <= set(metrics)
    assert 0.0 <= metrics["train/acc"] <= 1.0 and metrics["loss"] > 0
    header = next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    assert {"loss", "train/acc", "lr"} <= set(header.split(","))

    meta = json.loads((tmp_path / "export" / "grace_config.json").read_text())
    assert meta["method"] == method and meta["embedding_mode"] == "base"
    assert meta["system_prompt"] == cfg.prompt.system_prompt
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    for p, q in zip(objects["model"].policy.parameters(), reloaded.parameters()):
        assert torch.equal(p.detach().cpu(), q)
    if method == "infonce":
        scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
        assert scores["mode"] == "base" and "eval/avg" in metrics


def test_contrastive_lora_trains_adapters_only_and_exports_merged(tmp_path):
    cfg = make_cfg([*TINY, "method=simcse", "peft=lora", "trainer.max_steps=1"], tmp_path)
    _, objects = train(cfg)
    policy = objects["model"].policy
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_embed_is_one_pass_without_a_kv_cache(tmp_path):
    """The baselines embed with one decoder pass and never decode: no KV cache is built (the
    memory model, scale.predict_contrastive_peak, counts none)."""
    cfg = make_cfg([*TINY, "method=infonce"], tmp_path)
    module = instantiate(cfg.model, _convert_="all")
    assert module.policy.config.use_cache  # without gradient checkpointing the config says build
    caches = []
    module.policy.get_decoder().register_forward_hook(
        lambda mod, args, out: caches.append(out.past_key_values)
    )
    emb = module.embed(["A man plays a guitar.", "A dog runs."])
    assert emb.shape[0] == 2 and emb.requires_grad
    assert caches == [None]
