"""Echo mode (issue 19): the text repeated as the "rationale", pooled exactly as a rationale,
checked against a hand computation on the tiny model."""

from __future__ import annotations

import pytest
import torch

from grace_lightning.eval.encoder import GenerationSettings, GraceEncoder
from grace_lightning.prompts import DEFAULT_SYSTEM_PROMPT

TEXTS = [
    "A man is playing a guitar on stage.",
    "Cats sleep.",
    "A man is playing a guitar on stage.",
]


def hand_echo(model, tok, text: str, max_new_tokens: int) -> torch.Tensor:
    """Chat template by hand (system + user text + assistant header), the text's tokens again
    (+ EOS when the copy fits the budget), one unpadded forward, mean over the positions after
    the system prompt part of the template: (D,)."""
    messages = [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": text},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = rendered[: rendered.index(text)]
    head_ids = tok(head, add_special_tokens=False)["input_ids"]
    text_ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt = tok(rendered, add_special_tokens=False)["input_ids"]
    assert (
        prompt[: len(head_ids)] == head_ids and prompt[len(head_ids) :][: len(text_ids)] == text_ids
    )
    copy = text_ids[:max_new_tokens]
    if len(copy) < max_new_tokens:
        eos = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
        copy = copy + [eos if isinstance(eos, int) else eos[0]]
    ids = torch.tensor([prompt + copy])
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0].float()  # (L, D)
    return hidden[len(head_ids) :].mean(0)


@pytest.mark.parametrize("max_new_tokens", [64, 4], ids=["copy+eos", "cut_copy"])
def test_echo_mode_is_prompt_plus_copy_mean_pooled(tiny_backbone, max_new_tokens):
    model, tok = tiny_backbone
    enc = GraceEncoder(
        model,
        tok,
        mode="echo",
        generation=GenerationSettings(max_new_tokens=max_new_tokens),
    )
    vecs, copies = enc.encode(TEXTS, batch_size=2, return_rationales=True, convert_to_tensor=True)
    assert vecs.shape == (3, model.config.hidden_size)
    for text, vec, copy in zip(TEXTS, vecs, copies):
        want = hand_echo(model, tok, text, max_new_tokens)
        torch.testing.assert_close(vec, want, atol=2e-5, rtol=1e-4)
        if max_new_tokens == 64:
            assert copy.strip() == text  # the "rationale" is the text itself
    torch.testing.assert_close(vecs[0], vecs[2])  # same text, same vector


def test_echo_differs_from_base_and_is_deterministic(tiny_backbone):
    model, tok = tiny_backbone
    enc = GraceEncoder(model, tok, mode="base", generation=GenerationSettings(max_new_tokens=32))
    base = enc.encode(TEXTS[:2], convert_to_tensor=True)
    echo = enc.encode(TEXTS[:2], mode="echo", convert_to_tensor=True)
    again = enc.encode(TEXTS[:2], mode="echo", convert_to_tensor=True, batch_size=1)
    assert (base - echo).abs().max() > 1e-3  # the copy is pooled too
    torch.testing.assert_close(echo, again, atol=2e-5, rtol=1e-4)  # batch split: same vectors
    assert enc.stats["generated"] == 0  # nothing sampled


def test_study_and_eval_accept_echo():
    from grace_lightning.study.stages import MODES as STUDY_MODES
    from grace_lightning.study.stages import check_rows

    assert "echo" in STUDY_MODES
    check_rows({"echo": {"label": "Echo", "tables": ["sup"], "eval": {"mode": "echo"}}})
