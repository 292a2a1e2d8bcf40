"""General-capability proxy (eval/general.py): perplexity by hand, greedy answers, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from grace_lightning.eval.general import (
    answer_instructions,
    default_heldout_texts,
    lm_eval_command,
    main,
    perplexity,
)

from .conftest import DATA_ROOT


def test_perplexity_is_exp_mean_nll_by_hand(tiny_backbone):
    model, tok = tiny_backbone
    text = "The cat sat on the mat because it was warm."
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (L, V)
    logp = logits.log_softmax(-1)
    nll = [-float(logp[i, ids[0, i + 1]]) for i in range(ids.size(1) - 1)]
    want = math.exp(sum(nll) / len(nll))
    got = perplexity(model, tok, [text])
    assert math.isfinite(got["perplexity"])
    assert got["tokens"] == len(nll)
    assert got["perplexity"] == pytest.approx(want, rel=1e-5)
    # a random 49k-vocab model is close to uniform: perplexity of the order of the vocab
    assert 0.1 * len(tok) < got["perplexity"] < 10 * len(tok)


def test_perplexity_pools_tokens_over_texts_and_batches(tiny_backbone):
    model, tok = tiny_backbone
    texts = ["A short one.", "A somewhat longer sentence with more words in it.", "Third."]
    singles = [perplexity(model, tok, [t]) for t in texts]
    nll = sum(s["nll"] * s["tokens"] for s in singles)
    tokens = sum(s["tokens"] for s in singles)
    for batch_size in (1, 2, 3):  # right padding never enters the score
        got = perplexity(model, tok, texts, batch_size=batch_size)
        assert got["tokens"] == tokens
        assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    cut = perplexity(model, tok, texts[1:2], max_tokens=4)
    assert cut["tokens"] == 3


def test_answers_are_greedy_and_keyword_scored(tiny_backbone):
    model, tok = tiny_backbone
    pairs = [("Say hi.", "hi"), ("What is 2 + 3?", "5"), "No expected word here."]
    a = answer_instructions(model, tok, pairs, max_new_tokens=4)
    b = answer_instructions(model, tok, pairs, max_new_tokens=4)
    assert [x["answer"] for x in a["answers"]] == [x["answer"] for x in b["answers"]]
    assert a["answers"][2]["hit"] is None
    hits = [x["hit"] for x in a["answers"][:2]]
    assert a["keyword_acc"] == pytest.approx(sum(hits) / 2)


def test_default_texts_are_scifact_abstracts():
    texts = default_heldout_texts(DATA_ROOT, max_texts=3)
    assert len(texts) == 3 and all(len(t.split()) > 50 for t in texts)
    assert "pretrained=/x" in lm_eval_command("/x")


def test_cli_on_a_saved_model_dir(tiny_backbone, tmp_path, capsys):
    model, tok = tiny_backbone
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "held.txt").write_text("First held-out line of text.\n\nSecond line here.\n")
    out = tmp_path / "general.json"
    report = main(
        [
            str(tmp_path / "model"),
            "--out",
            str(out),
            "--texts",
            str(tmp_path / "held.txt"),
            "--max-new-tokens",
            "3",
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["perplexity"] == pytest.approx(report["perplexity"])
    want = perplexity(model, tok, ["First held-out line of text.", "Second line here."])
    assert saved["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert len(saved["answers"]) == 8 and "perplexity" in capsys.readouterr().out
