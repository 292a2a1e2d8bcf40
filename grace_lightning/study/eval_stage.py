"""The study's evaluation stage: ``eval.py`` plus the per-example data the bootstrap needs.

``python -m grace_lightning.study.eval_stage <eval.py overrides>`` runs exactly what ``eval.py``
runs (same config, ``conf/eval.yaml``; same ``scores.json``), while recording every embedding
that mteb asks the model for, keyed by (task, prompt type, text). Afterwards each task's data is
rebuilt (deterministic: same suite, caps and seed) and turned into per-example arrays
(:mod:`grace_lightning.eval.bootstrap`), written to ``<run dir>/per_example.json``. Embeddings
that were not recorded in this process (a resumed evaluation whose tasks mteb skipped) are
encoded again: free for rationale rows (the rationale cache stores pooled embeddings), one
forward pass per text for base rows.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from grace_lightning.eval import bootstrap as bs

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
PER_EXAMPLE = "per_example.json"


class Recorder:
    """Wraps ``GraceMTEBModel.encode`` (this process only) and keeps what it returned."""

    def __init__(self) -> None:
        # (task, prompt type) -> text -> (D,) embedding
        self.store: dict[tuple[str, str | None], dict[str, np.ndarray]] = defaultdict(dict)
        self.model = None  # the GraceMTEBModel mteb used (for texts not recorded)
        self._original = None

    def __enter__(self) -> Recorder:
        from grace_lightning.eval.mteb_model import GraceMTEBModel

        self._original = original = GraceMTEBModel.encode
        recorder = self

        def encode(model, inputs, *, task_metadata, prompt_type=None, **kwargs):
            inputs = list(inputs)
            out = original(
                model, inputs, task_metadata=task_metadata, prompt_type=prompt_type, **kwargs
            )
            recorder.model = model
            texts = [t for batch in inputs for t in batch["text"]]
            ptype = getattr(prompt_type, "value", prompt_type)
            slot = recorder.store[(task_metadata.name, ptype)]
            for text, emb in zip(texts, np.asarray(out)):
                slot[text] = emb
            return out

        GraceMTEBModel.encode = encode
        return self

    def __exit__(self, *exc) -> None:
        from grace_lightning.eval.mteb_model import GraceMTEBModel

        GraceMTEBModel.encode = self._original

    def embed(self, cfg: DictConfig, task, texts: Sequence[str], prompt_type=None) -> np.ndarray:
        """(n, D) embeddings of ``texts`` as mteb encoded them for ``task``; missing ones are
        encoded now (same model, same system prompt for this prompt type)."""
        name = task.metadata.name
        ptype = getattr(prompt_type, "value", prompt_type)
        slots = [self.store[(name, ptype)]] + [
            s for (t, p), s in self.store.items() if t == name and p != ptype
        ]
        found: dict[str, np.ndarray] = {}
        for text in texts:
            for s in slots:
                if text in s:
                    found[text] = s[text]
                    break
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            log.info("%s: encoding %d texts not recorded in this process", name, len(missing))
            model = self.model or build_mteb_model(cfg)
            self.model = model
            self.encode_missing(model, task, missing, prompt_type)
            found.update({t: self.store[(name, ptype)][t] for t in missing})
        return np.stack([found[t] for t in texts])

    def encode_missing(self, model, task, texts: list[str], prompt_type) -> None:
        out = self._original(  # the unwrapped encode; stored here
            model,
            [{"text": texts}],
            task_metadata=task.metadata,
            hf_split=task.metadata.eval_splits[0],
            hf_subset="default",
            prompt_type=prompt_type,
            show_progress_bar=False,
        )
        slot = self.store[(task.metadata.name, getattr(prompt_type, "value", prompt_type))]
        for text, emb in zip(texts, np.asarray(out)):
            slot[text] = emb


def build_mteb_model(cfg: DictConfig):
    """The model ``evaluate(cfg)`` builds (for a process in which mteb encoded nothing)."""
    from pathlib import Path as _P

    from grace_lightning.eval.encoder import GenerationSettings
    from grace_lightning.eval.mteb_model import GraceMTEBModel
    from grace_lightning.eval.run import _prompt_kwargs, load_encoder

    encoder = load_encoder(
        cfg.model,
        mode=cfg.mode,
        device=cfg.get("device"),
        dtype=cfg.get("dtype"),
        generation=GenerationSettings(**OmegaConf.to_container(cfg.generation, resolve=True)),
        cache=_P(cfg.cache.path) if cfg.cache.enabled and cfg.mode == "rationale" else None,
        **_prompt_kwargs(cfg.get("prompt") or {}),
    )
    return GraceMTEBModel(encoder, show_progress_bar=False)


# ---------------------------------------------------------------------------- per task
def task_examples(cfg: DictConfig, rec: Recorder, task) -> bs.TaskExamples | None:
    """Per-example arrays of one (freshly built) task, or None for a type without them."""
    from mteb.types import PromptType

    task.load_data()
    name, ttype = task.metadata.name, task.metadata.type
    split = task.metadata.eval_splits[0]
    if ttype == "STS":
        d = task.dataset[split]
        s1, s2 = list(d["sentence1"]), list(d["sentence2"])
        e = rec.embed(cfg, task, s1 + s2)
        return bs.sts_examples(name, e[: len(s1)], e[len(s1) :], d["score"], bs.text_key(s1 + s2))
    if ttype == "Retrieval":
        data = task.dataset["default"][split]
        qids, qtexts = [str(x) for x in data["queries"]["id"]], list(data["queries"]["text"])
        corpus = data["corpus"]
        dids = [str(x) for x in corpus["id"]]
        dtexts = [(f"{t} {x}".strip() if t else x) for t, x in zip(corpus["title"], corpus["text"])]
        q = rec.embed(cfg, task, qtexts, PromptType.query)
        dv = rec.embed(cfg, task, dtexts, PromptType.document)
        per = bs.ndcg_at_10_per_query(
            q,
            dv,
            qids,
            dids,
            data["relevant_docs"],
            ignore_identical_ids=bool(getattr(task, "ignore_identical_ids", False)),
        )
        return bs.TaskExamples(name, "Retr", "mean", per, key=bs.text_key(qtexts + dtexts))
    if ttype == "Classification":
        from mteb.timing import TimingStack

        train, test = task.dataset[task.train_split], task.dataset[split]
        col, lab = task.input_column_name, task.label_column_name
        test_emb = rec.embed(cfg, task, list(test[col]))
        y = np.asarray(test[lab])
        correct = np.zeros(len(y))
        sim = None
        for i in range(task.n_experiments):
            _, sim, sel = task._undersample_data(train, i, sim)
            tr_emb = rec.embed(cfg, task, [train[col][j] for j in sel])
            _, pred = task._run_experiment(
                train.select(sel), test, tr_emb, test_emb, timer=TimingStack()
            )
            correct += np.asarray(pred) == y
        per = 100 * correct / task.n_experiments
        return bs.TaskExamples(
            name, "Class", "mean", per, key=bs.text_key(list(test[col]) + list(train[col]))
        )
    if ttype == "Clustering":
        d = task.dataset[split]
        texts, labels = list(d["sentences"]), np.asarray(d["labels"])
        e = rec.embed(cfg, task, texts)
        assign = bs.clustering_assignment(e, len(set(labels.tolist())), seed=int(task.seed))
        return bs.TaskExamples(name, "Clust", "v_measure", labels, assign, key=bs.text_key(texts))
    return None


def per_example(cfg: DictConfig, run: dict[str, Any], rec: Recorder) -> dict[str, bs.TaskExamples]:
    from grace_lightning.eval.run import tasks_from_cfg

    tasks = tasks_from_cfg(cfg)
    reported = {r["task"]: r["score"] for r in run["tasks"]}
    out: dict[str, bs.TaskExamples] = {}
    for task in tasks:
        name = task.metadata.name
        try:
            ex = task_examples(cfg, rec, task)
        except Exception as e:  # an interval is extra: never lose the evaluation for it
            log.warning("%s: no per-example data (%s: %s)", name, type(e).__name__, e)
            continue
        if ex is None:
            continue
        ex.reported = reported.get(name)
        ex.extra["recomputed"] = ex.score()
        out[name] = ex
        log.info(
            "%s: %d examples, recomputed %.2f (mteb %s)",
            name,
            ex.n,
            ex.extra["recomputed"],
            f"{ex.reported:.2f}" if ex.reported is not None else "?",
        )
    return out


def run_eval_stage(cfg: DictConfig) -> dict[str, Any]:
    from grace_lightning.eval.run import evaluate

    out_dir = Path(cfg.paths.output_dir)
    with Recorder() as rec:
        run = evaluate(cfg)
        examples = per_example(cfg, run, rec)
    bs.save_examples(out_dir / PER_EXAMPLE, examples)
    return run


@hydra.main(version_base="1.3", config_path=str(REPO_ROOT / "conf"), config_name="eval")
def main(cfg: DictConfig) -> None:
    run_eval_stage(cfg)


if __name__ == "__main__":
    main()
