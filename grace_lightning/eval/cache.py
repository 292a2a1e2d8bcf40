"""On-disk rationale cache: a second evaluation of the same model and texts generates nothing.

GRACE's inference cost is a sampled rationale (upstream eval: up to 2048 tokens, T=1.0) for every
query and document (notes §4-5), so rationales are worth keeping. One SQLite file holds them:

- key: sha256 over the model fingerprint, the system prompt, the prompt length limit, the text,
  the generation settings, the seed and the dtype (:func:`rationale_key`);
- value: the rationale's token ids and text, whether it ended with EOS, and its pooled embedding
  (float32), so a cache hit costs neither generation nor a forward pass.

Kill -9 safety comes from SQLite itself: WAL journal, one transaction per batch, ``synchronous=FULL``
(fsync at every commit). A killed writer loses at most its open transaction, never a committed row,
and never leaves a half-written one; the next run resumes with what was committed.

Model fingerprints (:func:`dir_fingerprint`, :func:`state_dict_fingerprint`) hash the weights;
hashing a model directory is memoised here by (path, size, mtime) so it runs once per checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DIR_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class CachedRationale:
    rationale: str
    response_ids: list[int]
    finished: bool
    embedding: np.ndarray | None  # (D,) float32, not normalised


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def rationale_key(
    fingerprint: str, system_prompt: str | None, text: str, settings: Mapping[str, Any]
) -> str:
    """Cache key of one text's rationale. ``settings`` holds generation settings, seed, dtype, ...
    (anything that changes the rationale or its embedding)."""
    payload = {
        "v": SCHEMA_VERSION,
        "model": fingerprint,
        "system_prompt": system_prompt,
        "text": text_sha(text),
        "settings": dict(sorted(settings.items())),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def dir_fingerprint(directory: str | Path, cache: RationaleCache | None = None) -> str:
    """sha256 over a model directory's config and weight files (names + contents)."""
    directory = Path(directory).resolve()
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.name in _DIR_FILES or p.suffix in _WEIGHT_SUFFIXES)
    )
    if not files:
        raise FileNotFoundError(f"{directory}: no config or weight files to fingerprint")
    stamp = json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    if cache is not None and (hit := cache.get_fingerprint(str(directory), stamp)):
        return hit
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        _hash_file(p, h)
    digest = h.hexdigest()
    if cache is not None:
        cache.put_fingerprint(str(directory), stamp, digest)
    return digest


def state_dict_fingerprint(model) -> str:
    """sha256 over an in-memory model's parameters and buffers (names, dtypes, shapes, bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class RationaleCache:
    """SQLite-backed store of rationales (+ embeddings), safe against kill -9.

    Counts hits and misses (``hits``, ``misses``, ``writes``) and logs them per lookup batch.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = self.writes = 0
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS rationales (
                    key TEXT PRIMARY KEY,
                    text TEXT,
                    rationale TEXT NOT NULL,
                    response_ids TEXT NOT NULL,
                    finished INTEGER NOT NULL,
                    embedding BLOB,
                    created REAL DEFAULT (julianday('now'))
                );
                CREATE TABLE IF NOT EXISTS fingerprints (
                    path TEXT PRIMARY KEY, stamp TEXT NOT NULL, digest TEXT NOT NULL
                );
                """
            )
        except sqlite3.DatabaseError as e:
            raise RuntimeError(
                f"rationale cache {self.path} is not a readable SQLite file ({e}); "
                f"move it away (or point cache.path elsewhere) and rerun"
            ) from None

    # -- rationales -----------------------------------------------------------------------------
    def get_many(self, keys: Iterable[str]) -> dict[str, CachedRationale]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, CachedRationale] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # SQLite's parameter limit
                chunk = keys[start : start + 500]
                rows = self._db.execute(
                    "SELECT key, rationale, response_ids, finished, embedding FROM rationales "
                    f"WHERE key IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                for key, rationale, ids, finished, emb in rows:
                    found[key] = CachedRationale(
                        rationale=rationale,
                        response_ids=json.loads(ids),
                        finished=bool(finished),
                        embedding=None if emb is None else np.frombuffer(emb, dtype=np.float32),
                    )
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        log.info(
            "rationale cache: %d hits, %d misses (%s)",
            len(found),
            len(keys) - len(found),
            self.path,
        )
        return found

    def put_many(self, items: Mapping[str, tuple[str, CachedRationale]]) -> None:
        """Store ``{key: (text, entry)}`` in one transaction (all or nothing)."""
        rows = [
            (
                key,
                text,
                entry.rationale,
                json.dumps([int(i) for i in entry.response_ids]),
                int(entry.finished),
                None
                if entry.embedding is None
                else np.asarray(entry.embedding, dtype=np.float32).tobytes(),
            )
            for key, (text, entry) in items.items()
        ]
        with self._lock, self._db:  # commits (fsync) on exit, rolls back on error
            self._db.executemany(
                "INSERT OR REPLACE INTO rationales "
                "(key, text, rationale, response_ids, finished, embedding) VALUES (?,?,?,?,?,?)",
                rows,
            )
        self.writes += len(rows)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM rationales").fetchone()[0]

    # -- model fingerprints (memo) ------------------------------------------------------------
    def get_fingerprint(self, path: str, stamp: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT digest FROM fingerprints WHERE path=? AND stamp=?", (path, stamp)
            ).fetchone()
        return row[0] if row else None

    def put_fingerprint(self, path: str, stamp: str, digest: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO fingerprints (path, stamp, digest) VALUES (?,?,?)",
                (path, stamp, digest),
            )

    # -- bookkeeping ----------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes}

    def check(self) -> str:
        """SQLite's integrity check ("ok" when the file is sound)."""
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> RationaleCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
