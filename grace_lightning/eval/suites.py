"""Evaluation suites (``conf/eval/*.yaml``) -> MTEB task objects.

A suite lists its tasks by MTEB category, in the paper's column order (notes §1-2)::

    source: mteb            # or local (tasks built from files, see local_tasks.py)
    languages: [eng]        # mteb: language filter for multilingual tasks (null: all subsets)
    splits: [test]          # mteb: default eval split(s)
    tasks:
      Retrieval: [ArguAna, {name: MSMARCO, splits: [dev]}]
      STS: [STS12, {name: STS17, subsets: [en-en]}]

Entries are a task name or ``{name, splits, subsets}``. ``get_task`` reads mteb's metadata only;
no data is downloaded until a task is evaluated.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

# MTEB task type -> the paper's column (Tables 1-2), in the paper's order
CATEGORY_COLUMNS: dict[str, str] = {
    "Retrieval": "Retr",
    "Reranking": "Rerank",
    "Clustering": "Clust",
    "PairClassification": "PairCl",
    "Classification": "Class",
    "STS": "STS",
    "Summarization": "Summ",
}


# suite-level settings of a local suite that apply to every task of the matching type
_SUITE_KNOBS = ("n_experiments", "samples_per_label", "n_clusters", "corpus_per_query")


class UnknownTaskError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class SuiteError(ValueError):
    pass


def unknown_task_error(name: str, known: Sequence[str], where: str = "mteb") -> UnknownTaskError:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    if not close:  # also try case-insensitive prefix/substring matches
        low = name.lower()
        close = [k for k in known if low in k.lower() or k.lower() in low][:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownTaskError(f"unknown task {name!r} (not in {where}).{hint}")


def mteb_task_names() -> list[str]:
    """Every task name the installed mteb knows (metadata only)."""
    try:
        from mteb.get_tasks import _TASKS_REGISTRY

        return sorted(_TASKS_REGISTRY)
    except ImportError:  # private name moved: fall back to the public API
        import mteb

        return sorted(t.metadata.name for t in mteb.get_tasks(exclude_superseded=False))


def suite_entries(suite: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten ``tasks: {Category: [entry, ...]}`` into dicts with ``name`` and ``category``."""
    tasks = suite.get("tasks") or {}
    if not isinstance(tasks, Mapping):
        raise SuiteError("suite.tasks must map a category (Retrieval, STS, ...) to a list of tasks")
    entries = []
    for category, items in tasks.items():
        if category not in CATEGORY_COLUMNS:
            raise SuiteError(f"suite category {category!r} is not one of {list(CATEGORY_COLUMNS)}")
        for item in items or []:
            entry = {"name": item} if isinstance(item, str) else dict(item)
            if "name" not in entry:
                raise SuiteError(f"suite entry {item!r} in {category} has no name")
            entry["category"] = category
            entries.append(entry)
    return entries


def select(entries: list[dict[str, Any]], only: Sequence[str] | None, where: str):
    """Keep the entries named in ``only`` (error with close matches for unknown names)."""
    if not only:
        return entries
    names = [e["name"] for e in entries]
    for name in only:
        if name not in names:
            raise unknown_task_error(name, names, where)
    return [e for e in entries if e["name"] in set(only)]


def mteb_tasks(suite: Mapping[str, Any], only: Sequence[str] | None = None) -> list:
    """The suite's tasks from the installed mteb, filtered to their splits/subsets/languages."""
    import mteb

    entries = select(suite_entries(suite), only, f"suite {suite.get('name')!r}")
    known = set(mteb_task_names())
    tasks = []
    for e in entries:
        if e["name"] not in known:
            raise unknown_task_error(e["name"], sorted(known))
        splits = e.get("splits", suite.get("splits"))
        task = mteb.get_task(
            e["name"],
            languages=None if e.get("subsets") else e.get("languages", suite.get("languages")),
            eval_splits=list(splits) if splits else None,
            hf_subsets=list(e["subsets"]) if e.get("subsets") else None,
        )
        tasks.append(task)
    return tasks


def build_tasks(
    suite: Mapping[str, Any],
    only: Sequence[str] | None = None,
    data_root: str | None = None,
    max_samples: int | None = None,
    seed: int = 42,
) -> list:
    """Task objects for a suite config (``source: mteb`` or ``source: local``)."""
    source = suite.get("source", "mteb")
    if source == "mteb":
        return mteb_tasks(suite, only)
    if source == "local":
        from grace_lightning.eval.local_tasks import make_local_task

        entries = select(suite_entries(suite), only, f"suite {suite.get('name')!r}")
        knobs = {k: suite[k] for k in _SUITE_KNOBS if suite.get(k) is not None}
        by_type = dict(suite.get("max_samples_by_type") or {})
        unknown = set(by_type) - set(CATEGORY_COLUMNS)
        if unknown:
            raise SuiteError(
                f"suite.max_samples_by_type: {sorted(unknown)} not task types; use {list(CATEGORY_COLUMNS)}"
            )
        tasks = []
        for e in entries:
            spec = {**knobs, **e, "type": e["category"]}
            cap = by_type.get(e["category"])
            if cap:  # a type's cap, tighter than the task's own when both are set
                spec["max_samples"] = min(int(cap), int(spec.get("max_samples") or cap))
            tasks.append(make_local_task(spec, data_root, max_samples, seed))
        return tasks
    raise SuiteError(f"suite.source={source!r}: use mteb or local")


def task_category(task) -> str:
    """The paper's column for a task (from its MTEB type)."""
    return CATEGORY_COLUMNS.get(task.metadata.type, task.metadata.type)
