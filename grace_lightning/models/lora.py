"""LoRA adapters on a backbone (``peft=lora``, conf/peft/lora.yaml): used by the GRACE policy, the
contrastive baselines, FSDP wrapping and the benches."""

from __future__ import annotations


def wrap_lora(model, cfg: dict):
    """Wrap the policy with LoRA adapters (PEFT)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.get("r", 16),
        lora_alpha=cfg.get("lora_alpha", 32),
        lora_dropout=cfg.get("lora_dropout", 0.05),
        target_modules=list(cfg["target_modules"]),
        bias=cfg.get("bias", "none"),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
