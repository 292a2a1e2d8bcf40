"""MTEB tasks built from local files, so that the whole evaluation runs offline.

Each task subclasses the installed mteb's own abstract task (``AbsTaskSTS``, ``AbsTaskRetrieval``,
``AbsTaskClassification``, ``AbsTaskClustering``) and overrides ``load_data`` the way mteb's mocks
do (``mteb/mocks/mock_tasks/*.py``): mteb then runs its usual evaluators and metrics on our data.

mteb reads ``metadata`` from the task *class* (``AbsTask.unload_data`` drops instance attributes
called ``metadata``), so :func:`make_local_task` creates one small subclass per configured task.

Files (under a data root, default ``$GRACE_DATA_ROOT`` else ``<repo>/../shared/data``; see
``../shared/data/README.md``):

- STS: JSON lines with two sentences and a score (STS12-16 test, STS-B dev, SICK trial 1-5).
- Retrieval: BEIR layout (``corpus.jsonl`` with ``_id/title/text``, ``queries.jsonl`` with
  ``_id/text``, a qrels TSV with ``query-id/corpus-id/score``), e.g. SciFact with its train qrels.
- Classification: JSON lines with text and label; a train file plus either a test file (TREC) or a
  deterministic stratified split of the train file (Banking77, whose test split is held out).
- Clustering: JSON lines with text and label (each label is one gold cluster).

``max_samples`` subsamples every task deterministically (seeded), for fast tests and smoke runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

REPO_ROOT = Path(__file__).resolve().parents[2]

MAIN_SCORES = {
    "STS": "cosine_spearman",
    "Retrieval": "ndcg_at_10",
    "Classification": "accuracy",
    "Clustering": "v_measure",
}


class LocalDataError(FileNotFoundError):
    """A local task's file is missing or unreadable."""


def default_data_root() -> Path:
    """``$GRACE_DATA_ROOT`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("GRACE_DATA_ROOT")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data").resolve()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LocalDataError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return rows


def _files_digest(paths: Sequence[Path]) -> str:
    """Short content hash of the data files: recorded by mteb as the dataset revision."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def _subsample(n: int, k: int | None, seed: int) -> list[int]:
    """Sorted, seeded choice of ``k`` of ``range(n)`` (all of them when ``k`` is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=k, replace=False).tolist())


def _label_ids(labels: Sequence[Any]) -> tuple[list[int], list[str]]:
    names = sorted({str(x) for x in labels})
    index = {name: i for i, name in enumerate(names)}
    return [index[str(x)] for x in labels], names


def stratified_split(
    labels: Sequence[Any], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Deterministic per-label split of ``range(len(labels))`` into (train, test) indices."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[str(label)].append(i)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in sorted(by_label):
        idx = np.array(by_label[label])
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx)))
        test.extend(idx[:n_test].tolist())
        train.extend(idx[n_test:].tolist())
    return sorted(train), sorted(test)


class _LocalTask:
    """Shared config of the local tasks; set as class attributes by :func:`make_local_task`."""

    spec: Mapping[str, Any] = {}
    data_root: Path = Path(".")
    max_samples: int | None = None

    def _path(self, key: str) -> Path:
        rel = self.spec.get(key)
        if rel is None:
            raise LocalDataError(f"local task {self.metadata.name}: config needs '{key}'")
        path = Path(rel) if Path(rel).is_absolute() else self.data_root / rel
        if not path.is_file():
            raise LocalDataError(
                f"local task {self.metadata.name}: file not found: {path} "
                f"(data root {self.data_root}; set eval.data_root or $GRACE_DATA_ROOT)"
            )
        return path

    def _limit(self) -> int | None:
        limits = [x for x in (self.spec.get("max_samples"), self.max_samples) if x]
        return min(limits) if limits else None


class LocalSTSTask(_LocalTask, AbsTaskSTS):
    """Sentence pairs with a gold score; main score Spearman of cosine similarities."""

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        s = self.spec
        rows = read_jsonl(self._path("path"))
        keep = _subsample(len(rows), self._limit(), self.seed)
        c1, c2, cs = (
            s.get("sentence1", "sentence1"),
            s.get("sentence2", "sentence2"),
            s.get("score", "score"),
        )
        data = {
            "sentence1": [rows[i][c1] for i in keep],
            "sentence2": [rows[i][c2] for i in keep],
            "score": [float(rows[i][cs]) for i in keep],
        }
        self.dataset = DatasetDict({self.metadata.eval_splits[0]: Dataset.from_dict(data)})
        self.data_loaded = True


class LocalRetrievalTask(_LocalTask, AbsTaskRetrieval):
    """BEIR-format retrieval. Only queries with judgements are kept (as mteb's loaders do).

    With ``max_samples`` the first k judged queries (seeded choice) are kept, and the corpus is cut
    to their relevant documents plus seeded random others, ``corpus_per_query`` (default 10) per
    query, so that the scores stay meaningful on small subsets.
    """

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        qrels: dict[str, dict[str, int]] = defaultdict(dict)
        with open(self._path("qrels"), encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                qrels[str(row["query-id"])][str(row["corpus-id"])] = int(row["score"])
        queries = [q for q in read_jsonl(self._path("queries")) if str(q["_id"]) in qrels]
        corpus = read_jsonl(self._path("corpus"))

        limit = self._limit()
        if limit is not None and limit < len(queries):
            queries = [queries[i] for i in _subsample(len(queries), limit, self.seed)]
            relevant = {d for q in queries for d in qrels[str(q["_id"])]}
            others = [i for i, d in enumerate(corpus) if str(d["_id"]) not in relevant]
            n_other = int(self.spec.get("corpus_per_query", 10)) * len(queries)
            extra = {others[i] for i in _subsample(len(others), n_other, self.seed)}
            corpus = [d for i, d in enumerate(corpus) if str(d["_id"]) in relevant or i in extra]
        qids = {str(q["_id"]) for q in queries}
        split = RetrievalSplitData(
            queries=Dataset.from_dict(
                {"id": [str(q["_id"]) for q in queries], "text": [q["text"] for q in queries]}
            ),
            corpus=Dataset.from_dict(
                {
                    "id": [str(d["_id"]) for d in corpus],
                    "title": [d.get("title") or "" for d in corpus],
                    "text": [d["text"] for d in corpus],
                }
            ),
            relevant_docs={q: dict(qrels[q]) for q in qids},
            top_ranked=None,
        )
        self.dataset = {"default": {self.metadata.eval_splits[0]: split}}
        self.data_loaded = True


class LocalClassificationTask(_LocalTask, AbsTaskClassification):
    """Logistic regression on ``samples_per_label`` train embeddings per label (mteb's protocol,
    ``n_experiments`` times). The test split is a file, or a stratified seeded split of the train
    file (``test_fraction``, ``split_seed``). ``max_samples`` caps both splits."""

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        s = self.spec
        text, label = s.get("text", "text"), s.get("label", "label")
        train_rows = read_jsonl(self._path("train"))
        if s.get("test"):
            test_rows = read_jsonl(self._path("test"))
        else:
            train_idx, test_idx = stratified_split(
                [r[label] for r in train_rows],
                float(s.get("test_fraction", 0.3)),
                int(s.get("split_seed", 0)),
            )
            test_rows = [train_rows[i] for i in test_idx]
            train_rows = [train_rows[i] for i in train_idx]
        limit = self._limit()
        test_rows = [test_rows[i] for i in _subsample(len(test_rows), limit, self.seed)]
        train_rows = [train_rows[i] for i in _subsample(len(train_rows), limit, self.seed + 1)]
        ids, _ = _label_ids([r[label] for r in train_rows + test_rows])
        n_train = len(train_rows)
        self.dataset = DatasetDict(
            {
                "train": Dataset.from_dict(
                    {"text": [r[text] for r in train_rows], "label": ids[:n_train]}
                ),
                self.metadata.eval_splits[0]: Dataset.from_dict(
                    {"text": [r[text] for r in test_rows], "label": ids[n_train:]}
                ),
            }
        )
        self.data_loaded = True


class LocalClusteringTask(_LocalTask, AbsTaskClustering):
    """Mini-batch k-means with k = number of gold labels; V-measure, averaged over ``n_clusters``
    bootstrap resamples of all (or ``max_samples``) documents (mteb's fast clustering)."""

    max_fraction_of_documents_to_embed = None  # embed every (subsampled) document

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        s = self.spec
        text, label = s.get("text", "text"), s.get("label", "label")
        rows = read_jsonl(self._path("path"))
        rows = [rows[i] for i in _subsample(len(rows), self._limit(), self.seed)]
        ids, _ = _label_ids([r[label] for r in rows])
        self.max_documents_per_cluster = len(rows)
        self.dataset = DatasetDict(
            {
                self.metadata.eval_splits[0]: Dataset.from_dict(
                    {"sentences": [r[text] for r in rows], "labels": ids}
                )
            }
        )
        self.data_loaded = True


TASK_CLASSES: dict[str, type[_LocalTask]] = {
    "STS": LocalSTSTask,
    "Retrieval": LocalRetrievalTask,
    "Classification": LocalClassificationTask,
    "Clustering": LocalClusteringTask,
}

# knobs of mteb's abstract tasks that a spec may set (class attributes)
_TASK_KNOBS = {
    "STS": ("min_score", "max_score"),
    "Retrieval": (),
    "Classification": ("n_experiments", "samples_per_label"),
    "Clustering": ("n_clusters",),
}


SPLIT_NAMES = ("train", "validation", "dev", "trial", "test")


def source_split(spec: Mapping[str, Any]) -> str:
    """The split of the public dataset that a local task scores (``source_split`` in the spec,
    else read from the scored file's name: ``sick/trial.jsonl`` -> trial,
    ``scifact/qrels/train.tsv`` -> train), for model cards and reports. mteb sees every local
    task's data under ``split`` (default ``test``), whatever the source split."""
    if spec.get("source_split"):
        return str(spec["source_split"])
    scored = spec.get("test") or spec.get("path") or spec.get("qrels") or spec.get("train")
    stem = Path(str(scored or "")).stem.lower()
    return next((name for name in SPLIT_NAMES if name in stem.split("_")), "test")


def _data_files(spec: Mapping[str, Any], data_root: Path) -> list[Path]:
    keys = ("path", "corpus", "queries", "qrels", "train", "test")
    paths = []
    for key in keys:
        rel = spec.get(key)
        if rel:
            path = Path(rel) if Path(rel).is_absolute() else data_root / rel
            if not path.is_file():
                raise LocalDataError(
                    f"local task {spec.get('name')}: file not found: {path} "
                    f"(data root {data_root}; set eval.data_root or $GRACE_DATA_ROOT)"
                )
            paths.append(path)
    return paths


def make_local_task(
    spec: Mapping[str, Any],
    data_root: str | Path | None = None,
    max_samples: int | None = None,
    seed: int = 42,
):
    """Build one local MTEB task from a config entry such as::

    {name: LocalSTS12, type: STS, path: sts12/test.jsonl}
    {name: LocalSICKTrial, type: STS, path: sick/trial.jsonl, sentence1: sentence_A,
     sentence2: sentence_B, score: relatedness_score, min_score: 1, max_score: 5}
    {name: LocalSciFactTrain, type: Retrieval, corpus: scifact/corpus.jsonl,
     queries: scifact/queries.jsonl, qrels: scifact/qrels/train.tsv}
    {name: LocalTRECClassification, type: Classification, train: trec/train.jsonl,
     test: trec/test.jsonl, label: coarse_label}
    {name: LocalTRECClustering, type: Clustering, path: trec/test.jsonl, label: coarse_label}

    ``source_split`` (optional) names the public split the task scores for model cards and
    reports; by default it is read from the scored file's name (``source_split``).
    """
    spec = dict(spec)
    name, task_type = spec.get("name"), spec.get("type")
    if task_type not in TASK_CLASSES:
        raise ValueError(
            f"local task {name!r}: type {task_type!r} is not one of {sorted(TASK_CLASSES)}"
        )
    root = Path(data_root) if data_root else default_data_root()
    files = _data_files(spec, root)
    split = spec.get("split", "test")
    metadata = TaskMetadata(
        name=name,
        description=spec.get("description") or f"Local {task_type} task from {root}",
        reference=spec.get("reference"),
        dataset={"path": str(root), "revision": _files_digest(files)},
        type=task_type,
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=["eng-Latn"],
        main_score=MAIN_SCORES[task_type],
        date=None,
        domains=[],
        task_subtypes=[],
        license="not specified",
        annotations_creators="derived",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )
    attrs: dict[str, Any] = {
        "metadata": metadata,
        "spec": spec,
        "data_root": root,
        "max_samples": max_samples,
        "source_split": source_split(spec),
    }
    for knob in _TASK_KNOBS[task_type]:
        if spec.get(knob) is not None:
            attrs[knob] = spec[knob]
    cls = type(str(name).replace("-", "_"), (TASK_CLASSES[task_type],), attrs)
    return cls(seed=seed)
