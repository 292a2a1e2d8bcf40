"""The validated training data as a memory-mapped Arrow file, built once per source.

Upstream's supervised file has about 1.5M triplets. Reading it into Python lists on every rank at
every start, and re-tokenising every policy prompt for the <= 1024-token filter, costs minutes
and gigabytes per rank. Here:

- :func:`open_store` streams the file through the validating readers (``file:line:field``
  errors, :mod:`grace_lightning.data.readers`) into ONE Arrow file (``datasets`` ``ArrowWriter``)
  under ``<cache_dir>/<fingerprint>/``, then every rank memory-maps it
  (``datasets.Dataset.from_file``): the pages are shared through the OS page cache.
  The fingerprint covers what decides the content: the reader version, the mode, the
  resolved path with its size and modification time, the field names, ``on_error`` and
  ``max_examples``. A changed file gets a new store; a finished store is never rewritten.
- :func:`cached_lengths` adds the policy-prompt token counts as a cached ``datasets.map``
  (``n_tokens``, its own Arrow file keyed by the store and the tokenizer/prompt identity), so
  the length filter tokenises each prompt once, not per rank and per start.
- Concurrent builders (DDP ranks start together, before any process group exists; a requeued
  job next to a running one) serialise on a file lock next to the store: the first builds, the
  others wait and open the finished files. Everything is written to a temp name and renamed.

Columns: ``query`` / ``positive`` / ``negatives`` (list of strings) for ``sup``, ``text`` for
``unsup``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from grace_lightning.data.readers import ReadReport, Triplet, check_not_empty

log = logging.getLogger(__name__)

STORE_VERSION = "grace-arrow-v1"  # bump when the stored columns or the validation change
WRITE_BATCH = 10_000  # rows per Arrow record batch
LENGTH_BATCH = 4_096  # texts per call of the token counter
DATA_FILE = "data.arrow"
REPORT_FILE = "report.json"


def fingerprint(parts: dict[str, Any]) -> str:
    blob = json.dumps({"version": STORE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _features(mode: str):
    import datasets

    if mode == "sup":
        return datasets.Features(
            {
                "query": datasets.Value("string"),
                "positive": datasets.Value("string"),
                "negatives": datasets.Sequence(datasets.Value("string")),
            }
        )
    return datasets.Features({"text": datasets.Value("string")})


def _rows(mode: str, items: Iterable[Triplet | str]) -> Iterator[dict[str, list]]:
    """Validated items -> column batches of ``WRITE_BATCH`` rows."""
    cols: dict[str, list] = {}
    for item in items:
        if mode == "sup":
            row = {"query": item.query, "positive": item.positive, "negatives": item.negatives}
        else:
            row = {"text": item}
        for k, v in row.items():
            cols.setdefault(k, []).append(v)
        if len(cols[next(iter(cols))]) >= WRITE_BATCH:
            yield cols
            cols = {}
    if cols:
        yield cols


def _lock(path: Path):
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def open_store(
    cache_dir: Path,
    key: dict[str, Any],
    mode: str,
    read: Callable[[ReadReport], Iterable[Triplet | str]],
    source: str,
):
    """``(dataset, report, built)``: the memory-mapped store for ``key``, built from
    ``read(report)`` (a stream of validated items) if it does not exist yet."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    fp = fingerprint({"mode": mode, **key})
    where = cache_dir / fp
    built = False
    with _lock(cache_dir / f"{fp}.lock"):
        if not (where / REPORT_FILE).is_file():
            where.mkdir(parents=True, exist_ok=True)
            report = ReadReport(source=source)
            tmp = where / f".{DATA_FILE}.tmp-{os.getpid()}"
            try:
                with ArrowWriter(features=_features(mode), path=str(tmp)) as writer:
                    for batch in _rows(mode, read(report)):
                        writer.write_batch(batch)
                    writer.finalize()
                check_not_empty(report)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, where / DATA_FILE)
            meta = {"report": _report_json(report), "key": key, "mode": mode}
            tmp_report = where / f".{REPORT_FILE}.tmp-{os.getpid()}"
            tmp_report.write_text(json.dumps(meta, indent=1, default=str))
            os.replace(tmp_report, where / REPORT_FILE)  # written last: marks the store done
            built = True
            log.info("data: stored %d examples in %s", report.kept, where)
    meta = json.loads((where / REPORT_FILE).read_text())
    report = _report_from_json(meta["report"])
    ds = datasets.Dataset.from_file(str(where / DATA_FILE))  # memory-mapped
    return ds, report, built


def _report_json(report: ReadReport) -> dict[str, Any]:
    out = asdict(report)
    out["skipped"] = dict(report.skipped)
    return out


def _report_from_json(data: dict[str, Any]) -> ReadReport:
    from collections import Counter

    return ReadReport(
        source=data["source"],
        kept=data["kept"],
        blank=data["blank"],
        skipped=Counter(data["skipped"]),
        messages=list(data["messages"]),
        truncated=data["truncated"],
    )


def store_dir(ds) -> Path | None:
    """The store directory of a dataset opened by :func:`open_store` (None if in memory)."""
    files = getattr(ds, "cache_files", None) or []
    return Path(files[0]["filename"]).parent if files else None


def cached_lengths(
    ds,
    column: str,
    count_tokens: Callable[[list[str]], list[int]],
    key: str | None,
):
    """The token count of every row's ``column`` as a numpy array.

    With ``key`` (the tokenizer + prompt identity) and a stored dataset the counts are a cached
    ``datasets.map`` next to the store (``lengths-<hash>.arrow``): computed once, then read back
    by every rank and every later start. Without a key they are computed in memory.
    """
    import numpy as np

    def counts(batch: list[str]) -> dict[str, list[int]]:
        got = list(count_tokens(batch))
        if len(got) != len(batch):
            raise ValueError(f"count_tokens returned {len(got)} counts for {len(batch)} texts")
        return {"n_tokens": [int(c) for c in got]}

    where = store_dir(ds)
    if key is None or where is None:
        out: list[int] = []
        for i in range(0, len(ds), LENGTH_BATCH):
            out.extend(counts(ds[i : i + LENGTH_BATCH][column])["n_tokens"])
        return np.asarray(out, dtype=np.int64)
    tag = hashlib.sha256(f"{column}\n{key}".encode()).hexdigest()[:16]
    path = where / f"lengths-{tag}.arrow"
    with _lock(where / f"lengths-{tag}.lock"):
        mapped = ds.map(
            counts,
            input_columns=column,
            batched=True,
            batch_size=LENGTH_BATCH,
            remove_columns=ds.column_names,
            cache_file_name=str(path),
            new_fingerprint=f"{ds._fingerprint}-{tag}",
            load_from_cache_file=True,
            desc="prompt lengths (once per data file and tokenizer)",
        )
    return mapped.data.column("n_tokens").to_numpy().astype(np.int64)
