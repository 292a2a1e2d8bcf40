"""Dev-set model selection (callbacks/dev_eval.py): scores, logging, checkpoint selection."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from grace_lightning.callbacks.dev_eval import (
    DevEvaluation,
    DevTask,
    embed_texts,
    load_dev_pairs,
    score_pairs,
    spearman_x100,
)
from grace_lightning.prompts import ChatPrompter

from .conftest import DATA_ROOT
from .test_train import TINY, make_cfg


def test_spearman_and_cosine_scores_by_hand():
    assert spearman_x100([0.1, 0.5, 0.9], [1, 2, 3]) == pytest.approx(100.0)
    assert spearman_x100([0.9, 0.5, 0.1], [1, 2, 3]) == pytest.approx(-100.0)
    # ranks (1, 3, 2) vs (1, 2, 3): rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert spearman_x100([0.0, 2.0, 1.0], [1, 2, 3]) == pytest.approx(50.0)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # cosines 1, 0.71, 0
    assert score_pairs(a, b, [5.0, 3.0, 0.0]) == pytest.approx(100.0)


def test_dev_pairs_are_seeded_subsets_and_test_files_are_refused(tmp_path):
    task = DevTask(
        "sick_trial",
        "sick/trial.jsonl",
        "sentence_A",
        "sentence_B",
        "relatedness_score",
        max_samples=5,
    )
    s1, s2, gold = load_dev_pairs(task, DATA_ROOT, seed=1)
    assert len(s1) == len(s2) == len(gold) == 5 and all(1 <= g <= 5 for g in gold)
    assert load_dev_pairs(task, DATA_ROOT, seed=1) == (s1, s2, gold)
    (tmp_path / "test.jsonl").write_text(
        json.dumps({"sentence1": "a", "sentence2": "b", "score": 1}) + "\n"
    )
    with pytest.raises(ValueError, match="test split"):
        load_dev_pairs(DevTask("x", str(tmp_path / "test.jsonl")))
    with pytest.raises(FileNotFoundError, match="file not found"):
        load_dev_pairs(DevTask("x", "nowhere/dev.jsonl"), DATA_ROOT)


def test_summary_survives_a_resume():
    """A resumed run scored its start before the kill: the summary comes from the state dict."""
    cb = DevEvaluation(max_samples=4)
    cb.history = [
        {"rollout_batch": 0.0, "val/dev_avg": 10.0},
        {"rollout_batch": 2.0, "val/dev_avg": 12.0},
    ]
    cb.mode_at_start, cb.start_scores = "rationale", {"val/dev_avg": 10.0}
    state = cb.state_dict()
    again = DevEvaluation(max_samples=4)
    again.load_state_dict(state)
    assert again.summary() is None  # nothing scored since the resume
    again.history = [{"rollout_batch": 5.0, "val/dev_avg": 17.5}]
    text = again.summary()
    assert "base model, w/ reasoning" in text and "trained, 5 rollout batches" in text
    assert "dev_avg +7.50 over the untrained model (w/ reasoning)" in text


def test_bad_knobs_fail_with_what_to_change():
    with pytest.raises(ValueError, match="mode"):
        DevEvaluation(mode="mean")
    with pytest.raises(ValueError, match="every_n_rollout_batches"):
        DevEvaluation(every_n_rollout_batches=-1)


@pytest.mark.parametrize("mode", ["base", "rationale"])
def test_embed_texts_matches_the_encoder_paths(tiny_backbone, mode):
    from grace_lightning.embedding import encode_prompts

    model, tok = tiny_backbone
    prompter = ChatPrompter(tok, "Explain.", 64)
    texts = ["a dog runs", "a cat sleeps", "a dog runs"]
    gen = {"max_new_tokens": 3, "seed": 0}
    emb = embed_texts(model, tok, prompter, texts, mode, gen, batch_size=2)
    assert emb.shape == (3, model.config.hidden_size)
    torch.testing.assert_close(emb[0], emb[2])  # duplicates: one encoding
    again = embed_texts(model, tok, prompter, texts[1:2], mode, gen)  # batch-independent
    torch.testing.assert_close(emb[1], again[0], rtol=1e-4, atol=1e-5)
    if mode == "base":
        ref = encode_prompts(
            model, prompter.encode(texts[:2]), prompter.system_len, tok.pad_token_id
        )
        torch.testing.assert_close(emb[:2], ref.float(), rtol=1e-5, atol=1e-5)


def test_evaluate_returns_each_task_and_the_average(tiny_backbone):
    model, tok = tiny_backbone
    cb = DevEvaluation(data_root=str(DATA_ROOT), max_samples=6, mode="base")
    module = SimpleNamespace(policy=model, tokenizer=tok, prompter=ChatPrompter(tok, None, 64))
    scores = cb.evaluate(module)
    assert set(scores) == {"val/stsb_dev", "val/sick_trial", "val/dev_avg"}
    assert all(-100 <= v <= 100 for v in scores.values())
    assert scores["val/dev_avg"] == pytest.approx(
        (scores["val/stsb_dev"] + scores["val/sick_trial"]) / 2
    )


def test_training_logs_dev_scores_and_checkpoint_keeps_the_best(tmp_path, monkeypatch):
    from grace_lightning.train import train

    cfg = make_cfg(
        [
            *TINY,
            "trainer.max_steps=6",  # 3 rollout batches of 2 optimiser steps
            "dev=default",
            "callbacks.dev_eval.max_samples=6",
            "callbacks.dev_eval.every_n_rollout_batches=1",
            f"callbacks.dev_eval.export_best_dir={tmp_path}/export_best",
            "callbacks.model_checkpoint.every_n_rollout_batches=1",
            "+callbacks.model_checkpoint.monitor=val/dev_avg",
            "+callbacks.model_checkpoint.mode=max",
            "callbacks.model_checkpoint.save_top_k=1",
        ],
        tmp_path,
    )
    cfg.callbacks.model_checkpoint.filename = "best_{step:06d}"
    assert cfg.callbacks.dev_eval.generation.max_new_tokens == cfg.rollout.max_new_tokens
    # a known dev score per evaluation: 10 at start, then 30, 20, 20 after rollout batches 1-3
    values = iter([10.0, 30.0, 20.0, 20.0])

    def fake_evaluate(self, pl_module, mode=None):
        v = 5.0 if mode == "base" else next(values)  # base: the untrained model, no rationale
        return {"val/stsb_dev": v, "val/sick_trial": v, "val/dev_avg": v}

    monkeypatch.setattr(DevEvaluation, "evaluate", fake_evaluate)
    _, objects = train(cfg)
    trainer = objects["trainer"]
    dev = next(c for c in trainer.callbacks if isinstance(c, DevEvaluation))
    # at start, after each rollout batch; not again at the end (the last batch was just scored)
    assert [h["val/dev_avg"] for h in dev.history] == [10.0, 30.0, 20.0, 20.0]
    assert [h["rollout_batch"] for h in dev.history] == [0.0, 1.0, 2.0, 3.0]
    assert float(trainer.callback_metrics["val/dev_avg"]) == 20.0

    ckpt = trainer.checkpoint_callback
    assert ckpt.monitor == "val/dev_avg"
    assert float(ckpt.best_model_score) == 30.0
    assert ckpt.best_model_path.endswith("best_000002.ckpt")  # after rollout batch 1 = step 2
    assert (tmp_path / "export_best" / "config.json").exists()

    rows = list(csv.DictReader(next((tmp_path / "csv").rglob("metrics.csv")).open()))
    logged = [float(r["val/dev_avg"]) for r in rows if r.get("val/dev_avg")]
    assert logged == [10.0, 30.0, 20.0, 20.0]

    # the closing table train.py prints: base (no rationale), untrained w/ reasoning, final
    lines = dev.summary().splitlines()
    assert lines[2].startswith("base model, no rationale") and lines[2].split()[-1] == "5.00"
    assert lines[3].startswith("base model, w/ reasoning") and lines[3].split()[-1] == "10.00"
    assert lines[4].startswith("trained, 3 rollout batches") and lines[4].split()[-1] == "20.00"
    assert "dev_avg +10.00 over the untrained model" in lines[5]
    assert lines[6].split()[:6] == ["best", "dev_avg", "30.00", "after", "1", "rollout"]
    assert lines[6].endswith(f"{tmp_path}/export_best")


@pytest.mark.parametrize(("method", "mode"), [("grace", "rationale"), ("infonce", "base")])
def test_real_scores_in_a_tiny_run(tmp_path, method, mode, capsys):
    """Without the fake: the callback scores the tiny policy during training, in the mode the
    run is evaluated in (auto: rationale for GRACE, base for the contrastive baseline)."""
    from grace_lightning.train import train

    steps = ["trainer.max_steps=1"] if method == "infonce" else []
    cfg = make_cfg(
        [
            *TINY,
            *steps,
            f"method={method}",
            "dev=default",
            "callbacks.dev_eval.max_samples=4",
            "callbacks.dev_eval.every_n_rollout_batches=1",
        ],
        tmp_path,
    )
    _, objects = train(cfg)
    dev = next(c for c in objects["trainer"].callbacks if isinstance(c, DevEvaluation))
    assert dev.resolved_mode(objects["model"]) == mode
    assert len(dev.history) == 2  # at start + after the only rollout batch
    assert all(math.isfinite(h["val/dev_avg"]) for h in dev.history)
    assert "val/dev_avg" in objects["trainer"].callback_metrics
    # rationale runs also score the untrained model without a rationale (the paper's Base row)
    assert (dev.start_base is not None) == (mode == "rationale")
    text = dev.summary()
    assert "trained, 1 rollout batches" in text and f"{dev.history[-1]['val/dev_avg']:.2f}" in text
    assert capsys.readouterr().out.count("Dev score (Spearman") == 1  # printed by train()
