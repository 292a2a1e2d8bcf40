"""General capability: is the trained policy still a language model? (an offline proxy)

The paper reports that GRACE keeps the LLM an LLM while contrastive fine-tuning destroys it
(Qwen2.5-1.5B general Avg 40.74 -> 41.08 GRACE vs 8.38 CL, on lm-eval tasks that need the Hub).
This module measures the same thing offline, per model (run it on each study row's export):

- ``perplexity``: token-level perplexity, exp(total NLL / scored tokens), of plain held-out text
  (no chat template). Default text: the first ``max_texts`` SciFact corpus abstracts
  (``../shared/data/scifact/corpus.jsonl``, "title. abstract", cut to ``max_tokens`` tokens).
  Why SciFact: no training set of this project contains it (GRACE sup/InfoNCE train on
  Wikipedia ICT triplets, SNLI or the paper's data; unsup/SimCSE on Wikipedia sentences; the
  SciFact retrieval eval only embeds it, it never trains on it), its abstracts are long, fluent
  English paragraphs (perplexity needs context), and it is another domain than the Wikipedia
  training text, so an LM that has lost general language shows it here.
- ``instructions``: a few fixed instructions answered greedily through the chat template (no
  system prompt), returned as text to read before/after, plus ``keyword_acc``: the fraction
  whose answer contains the expected word (a crude, automatic check that the model still
  follows instructions; a destroyed LM answers none).

CLI: ``python -m grace_lightning.eval.general <model dir | smollm2 | tiny> --out general.json``.
With the Hub, the paper's own general tasks: ``lm_eval --model hf --model_args
pretrained=<export dir> --tasks <tasks>`` (`lm_eval_command`), not run here.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "answer_instructions",
    "default_heldout_texts",
    "general_report",
    "lm_eval_command",
    "load_model",
    "perplexity",
]

# (instruction, expected word in a correct answer; lower-case substring match)
DEFAULT_INSTRUCTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France? Answer in one word.", "paris"),
    ("What is 2 + 3? Answer with a number.", "5"),
    ("What is the opposite of 'hot'? Answer in one word.", "cold"),
    ("What colour is a clear daytime sky? Answer in one word.", "blue"),
    ("How do you say 'hello' in Spanish? Answer in one word.", "hola"),
    ("Name the largest planet in the solar system.", "jupiter"),
    ("Write one sentence about a dog.", "dog"),
    ("Complete the sequence: Monday, Tuesday, ...", "wednesday"),
)


def default_heldout_texts(data_root: str | Path | None = None, max_texts: int = 64) -> list[str]:
    """The first ``max_texts`` SciFact corpus documents as "title. abstract" (file order)."""
    from grace_lightning.eval.local_tasks import default_data_root, read_jsonl

    path = Path(data_root or default_data_root()) / "scifact" / "corpus.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"held-out text not found: {path} (pass --texts <file> or set $GRACE_DATA_ROOT)"
        )
    rows = read_jsonl(path)[:max_texts]
    return [f"{r.get('title', '').strip()}. {r['text'].strip()}".strip(". ") for r in rows]


@torch.no_grad()
def perplexity(
    model, tokenizer, texts: list[str], max_tokens: int = 256, batch_size: int = 8
) -> dict[str, float]:
    """Token-level perplexity of ``texts``: exp(sum of NLLs / number of predicted tokens).

    Each text is tokenised on its own (with the tokenizer's own special tokens, if it adds any)
    and cut to ``max_tokens`` tokens; tokens 2..L of each text are scored given the ones
    before. Texts are batched with right padding (masked out).
    Returns ``{"perplexity", "nll" (mean per token), "tokens"}``; eval mode, no gradient.
    """
    device = next(model.parameters()).device
    enc = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens] for t in texts]
    enc = [e for e in enc if len(e) >= 2]
    if not enc:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(enc), batch_size):
            chunk = enc[start : start + batch_size]
            length = max(len(e) for e in chunk)
            ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for i, e in enumerate(chunk):
                ids[i, : len(e)] = torch.tensor(e)
                mask[i, : len(e)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (b, L, V)
            nll = torch.nn.functional.cross_entropy(  # fp32: (b, L-1), position j predicts j+1
                logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
            )
            keep = mask[:, 1:].bool()
            total_nll += float(nll[keep].sum())
            total_tokens += int(keep.sum())
    finally:
        model.train(was)
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": float(total_tokens)}


@torch.no_grad()
def answer_instructions(
    model,
    tokenizer,
    instructions: list[tuple[str, str]] | list[str] = DEFAULT_INSTRUCTIONS,
    max_new_tokens: int = 48,
) -> dict[str, Any]:
    """Greedy answers to ``instructions`` (chat template, no system prompt).

    instructions: strings, or (instruction, expected word) pairs. Returns ``{"answers":
    [{"instruction", "answer", "expected", "hit"}], "keyword_acc"}`` (keyword_acc over the
    pairs that have an expected word; NaN when none has one).
    """
    from grace_lightning.prompts import ChatPrompter
    from grace_lightning.rollout.engine import HFRolloutEngine

    pairs = [(x, None) if isinstance(x, str) else (x[0], x[1]) for x in instructions]
    prompter = ChatPrompter(tokenizer, None, 512)
    engine = HFRolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens)
    was = model.training
    model.eval()
    try:
        out = engine.generate(
            prompter.encode([p for p, _ in pairs]), num_samples=1, temperature=0.0
        )
    finally:
        model.train(was)
    texts = out.response_texts(tokenizer)
    answers = []
    for (instruction, expected), answer in zip(pairs, texts):
        hit = None if expected is None else expected.lower() in answer.lower()
        answers.append(
            {"instruction": instruction, "answer": answer, "expected": expected, "hit": hit}
        )
    scored = [a["hit"] for a in answers if a["hit"] is not None]
    acc = sum(scored) / len(scored) if scored else float("nan")
    return {"answers": answers, "keyword_acc": acc}


def lm_eval_command(model_dir: str | Path, tasks: str = "mmlu,arc_challenge,hellaswag") -> str:
    """The lm-eval-harness command for the paper-style general benchmarks (needs the Hub)."""
    return (
        f"lm_eval --model hf --model_args pretrained={model_dir},dtype=bfloat16 "
        f"--tasks {tasks} --batch_size auto --output_path {Path(model_dir) / 'lm_eval'}"
    )


def load_model(spec: str, device: str = "cpu"):
    """(model, tokenizer) from an export / save_pretrained dir, or ``smollm2`` / ``tiny``."""
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    if spec in ("smollm2", "tiny"):
        cfg = BackboneConfig() if spec == "smollm2" else BackboneConfig(name="tiny", source="tiny")
    else:
        if not (Path(spec) / "config.json").is_file():
            raise FileNotFoundError(f"{spec}: not a model dir (no config.json), smollm2 or tiny")
        cfg = BackboneConfig(name=Path(spec).name, source="hub", pretrained=str(spec))
    model, tok = load_backbone(cfg)
    return model.to(device).eval(), tok


def general_report(
    model,
    tokenizer,
    texts: list[str] | None = None,
    *,
    max_tokens: int = 256,
    max_new_tokens: int = 48,
    batch_size: int = 8,
) -> dict[str, Any]:
    """``{"perplexity", "nll", "tokens", "keyword_acc", "answers"}`` for one model."""
    texts = texts if texts is not None else default_heldout_texts()
    report: dict[str, Any] = dict(perplexity(model, tokenizer, texts, max_tokens, batch_size))
    report.update(answer_instructions(model, tokenizer, max_new_tokens=max_new_tokens))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m grace_lightning.eval.general",
        description="Offline general-capability proxy: held-out perplexity + greedy answers.",
    )
    parser.add_argument("model", help="export / save_pretrained dir, or smollm2 / tiny")
    parser.add_argument("--out", help="write the report here as JSON")
    parser.add_argument("--texts", help="held-out text file, one text a line (default SciFact)")
    parser.add_argument("--max-texts", type=int, default=64, help="texts scored (default 64)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per text")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    if args.texts:
        lines = Path(args.texts).read_text(encoding="utf-8").splitlines()
        texts = [t for t in lines if t.strip()][: args.max_texts]
    else:
        texts = default_heldout_texts(max_texts=args.max_texts)
    model, tok = load_model(args.model, args.device)
    report = general_report(
        model,
        tok,
        texts,
        max_tokens=args.max_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    report["model"] = args.model
    report["texts"] = args.texts or f"scifact/corpus.jsonl (first {args.max_texts})"
    print(
        f"{args.model}: perplexity {report['perplexity']:.2f} over {int(report['tokens'])} "
        f"tokens, instruction keyword accuracy {report['keyword_acc']:.2f}"
    )
    for a in report["answers"]:
        print(f"  Q: {a['instruction']}\n  A: {a['answer']!r}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
