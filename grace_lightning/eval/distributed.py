"""Rationale generation spread over several processes, one per device, same vectors as one process.

GRACE's evaluation samples a rationale (up to 2048 tokens) for every query and document; one
process on one device is too slow for the paper's 56 tasks (upstream uses vLLM with 4-way tensor
parallelism). Here each of N worker processes loads the model on its own device (``cuda:i``, or
the CPU for all N, each with ``cpu_count // N`` threads) and encodes a deterministic shard of the
texts; the parent puts the vectors back in input order. Because every text samples from its own
seeded stream (``rollout.engine.text_seed``), a text's rationale and embedding do not depend on
the shard or batch it lands in, so the result equals a single-process ``GraceEncoder.encode``
(up to float rounding of different batch shapes).

The rationale cache (``eval/cache.py``, SQLite): each worker reads the main cache file and writes
only its own shard file next to it (``<name>.rank<i>.sqlite``), so workers never contend for
SQLite's write lock (and a shared file system never sees concurrent writers). The parent merges
the shards into the main file after every ``encode`` call and on ``close``; shards left behind by
a killed run are merged when the next run starts.

    from functools import partial
    factory = partial(GraceEncoder.from_backbone, {"name": "tiny", "source": "tiny"},
                      mode="rationale", generation={"max_new_tokens": 64})
    vecs = encode_distributed(factory, texts, num_processes=2, cache="rationales.sqlite")

    with DistributedEncoder(factory, 2, cache="rationales.sqlite") as enc:   # workers stay up
        a = enc.encode(queries, batch_size=16)
        b = enc.encode(documents, batch_size=16, prompt_name="document")

``encoder_factory`` is called in each worker as ``encoder_factory(device=<device string>)`` and
must return a ``GraceEncoder``; it must be picklable (a module-level function or a
``functools.partial`` of one), because workers are spawned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_CACHE_TABLES = {
    "rationales": "key, text, rationale, response_ids, finished, embedding, created",
    "fingerprints": "path, stamp, digest",
}


# ----------------------------------------------------------------------------- sharding
def shard_texts(texts: Sequence[str], num_shards: int) -> list[list[str]]:
    """Distinct texts dealt round-robin after a stable sort by length (longest first), so shards
    get similar work; deterministic (depends on the texts only)."""
    unique = list(dict.fromkeys(texts))
    order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
    return [[unique[i] for i in order[r::num_shards]] for r in range(num_shards)]


def default_devices(num_processes: int) -> list[str]:
    """``cuda:0..N-1`` when there are that many GPUs, else the CPU for every process."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= num_processes:
        return [f"cuda:{i}" for i in range(num_processes)]
    if torch.cuda.is_available():
        log.warning(
            "%d processes but %d GPUs: running all of them on the CPU",
            num_processes,
            torch.cuda.device_count(),
        )
    return ["cpu"] * num_processes


# ----------------------------------------------------------------------------- cache shards
def shard_cache_path(main: Path, rank: int) -> Path:
    return main.with_name(f"{main.stem}.rank{rank}{main.suffix or '.sqlite'}")


class ShardCache:
    """A worker's view of the rationale cache: reads the main file and its own shard, writes
    only the shard (the parent merges shards into the main file). Duck-types ``RationaleCache``."""

    def __init__(self, main: Path, shard: Path):
        from grace_lightning.eval.cache import RationaleCache

        self.path = main
        self.main = RationaleCache(main)
        self.shard = RationaleCache(shard)

    def get_many(self, keys):
        keys = list(keys)
        found = self.main.get_many(keys)
        rest = [k for k in keys if k not in found]
        if rest:
            found.update(self.shard.get_many(rest))
        return found

    def put_many(self, items) -> None:
        self.shard.put_many(items)

    def get_fingerprint(self, path: str, stamp: str):
        return self.main.get_fingerprint(path, stamp) or self.shard.get_fingerprint(path, stamp)

    def put_fingerprint(self, path: str, stamp: str, digest: str) -> None:
        self.shard.put_fingerprint(path, stamp, digest)

    def stats(self) -> dict[str, int]:
        # a key found in the main file is a hit; a miss there that the shard has is one too
        hits = self.main.hits + self.shard.hits
        return {"hits": hits, "misses": self.shard.misses, "writes": self.shard.writes}

    def close(self) -> None:
        self.main.close()
        self.shard.close()


def merge_cache_shards(main: Path, shards: Sequence[Path], delete: bool = False) -> int:
    """Copy every row of ``shards`` into the main cache file (one transaction per shard);
    returns the number of rationale rows copied. ``delete``: remove each shard afterwards."""
    from grace_lightning.eval.cache import RationaleCache

    RationaleCache(main).close()  # the main file exists with its schema
    copied = 0
    con = sqlite3.connect(main, timeout=120)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        for shard in shards:
            if not Path(shard).exists():
                continue
            con.execute("ATTACH DATABASE ? AS shard", (str(shard),))
            try:
                have = {
                    r[0]
                    for r in con.execute("SELECT name FROM shard.sqlite_master WHERE type='table'")
                }
                with con:  # one transaction: all of a shard or nothing
                    for table, cols in _CACHE_TABLES.items():
                        if table in have:
                            cur = con.execute(
                                f"INSERT OR REPLACE INTO main.{table} ({cols}) "
                                f"SELECT {cols} FROM shard.{table}"
                            )
                            copied += cur.rowcount if table == "rationales" else 0
            finally:
                con.execute("DETACH DATABASE shard")
            if delete:
                for suffix in ("", "-wal", "-shm"):
                    Path(str(shard) + suffix).unlink(missing_ok=True)
    finally:
        con.close()
    return copied


# ----------------------------------------------------------------------------- worker
def with_autocast(encoder, precision: str | None):
    """Run ``encoder.encode`` under ``torch.autocast(<its device>, bfloat16)`` (``"bf16"``),
    fp32 weights kept; the cache key gets ``autocast`` so fp32 and bf16 rationales never mix.
    A shim until ``GraceEncoder`` has its own autocast option; returns the encode callable."""
    import torch

    if precision in (None, "fp32", "32", "32-true"):
        return encoder.encode
    if precision not in ("bf16", "bf16-mixed"):
        raise ValueError(f"precision={precision!r}: use fp32 or bf16")
    settings = encoder.settings
    encoder.settings = lambda: {**settings(), "autocast": "bfloat16"}

    def encode(*args, **kwargs):
        with torch.autocast(encoder.device.type, dtype=torch.bfloat16):
            return type(encoder).encode(encoder, *args, **kwargs)

    return encode


def _worker(rank, device, threads, factory, cache, precision, inbox, outbox) -> None:
    """One process: build the encoder on ``device``, then serve requests until ``None``."""
    try:
        import torch

        if device == "cpu" or str(device).startswith("cpu"):
            torch.set_num_threads(threads)
        elif str(device).startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        encoder = factory(device=device)
        if cache is not None:
            encoder.cache = ShardCache(Path(cache), shard_cache_path(Path(cache), rank))
        encode = with_autocast(encoder, precision)
        outbox.put(("ready", rank, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        outbox.put(("error", rank, traceback.format_exc()))
        return
    while True:
        msg = inbox.get()
        if msg is None:
            break
        kind, payload = msg
        try:
            if kind == "encode":
                texts, args, kwargs = payload
                emb, rationales = encode(texts, *args, **kwargs)
                result = (np.asarray(emb, dtype=np.float32), list(rationales))
            elif kind == "getattr":
                value = getattr(encoder, payload)
                result = ("<callable>", None) if callable(value) else ("value", value)
            elif kind == "call":
                name, args, kwargs = payload
                result = getattr(encoder, name)(*args, **kwargs)
            elif kind == "stats":
                cache_stats = encoder.cache.stats() if encoder.cache is not None else None
                result = (dict(encoder.stats), cache_stats)
            elif kind == "model_info":
                model = encoder.model
                result = (model.config, [(tuple(p.shape), p.dtype) for p in model.parameters()])
            else:
                raise ValueError(f"unknown request {kind!r}")
            outbox.put(("ok", rank, result))
        except BaseException:  # noqa: BLE001
            outbox.put(("error", rank, traceback.format_exc()))
    if encoder.cache is not None and hasattr(encoder.cache, "close"):
        encoder.cache.close()


class WorkerError(RuntimeError):
    """A worker process failed (its traceback is in the message)."""


class _ModelInfo:
    """What callers read off ``encoder.model`` (config, parameter count/dtype), without weights."""

    def __init__(self, config, params):
        self.config = config
        self._params = params

    def parameters(self):
        import torch

        for shape, dtype in self._params:
            yield torch.empty(shape, dtype=dtype, device="meta")


# ----------------------------------------------------------------------------- parent
class DistributedEncoder:
    """N worker processes, each with its own ``GraceEncoder``; ``encode`` like ``GraceEncoder``.

    Attributes the workers' encoders have (``mode``, ``fingerprint``, ``generation``, ``name``,
    ``system_prompt``, ``prompts``, ``max_prompt_tokens``, methods such as
    ``resolve_system_prompt``) are read from rank 0; ``stats`` sums over ranks; ``model`` is a
    weight-less stand-in with ``config`` and ``parameters()`` (meta tensors).
    ``precision="bf16"``: each worker encodes under bf16 autocast (``with_autocast``).
    """

    def __init__(
        self,
        encoder_factory: Callable[..., Any],
        num_processes: int,
        *,
        devices: Sequence[str] | None = None,
        cache: str | Path | None = None,
        precision: str | None = None,
        start_timeout: float | None = None,
    ):
        import torch.multiprocessing as mp

        if num_processes < 1:
            raise ValueError(f"num_processes={num_processes}: must be >= 1")
        self.num_processes = num_processes
        self.devices = list(devices) if devices else default_devices(num_processes)
        if len(self.devices) != num_processes:
            raise ValueError(f"{len(self.devices)} devices for {num_processes} processes")
        self.cache_path = Path(cache) if cache is not None else None
        if self.cache_path is not None:  # shards a killed run left behind
            left = [shard_cache_path(self.cache_path, r) for r in range(num_processes)]
            left += sorted(self.cache_path.parent.glob(f"{self.cache_path.stem}.rank*"))
            left = [p for p in dict.fromkeys(left) if p.suffix == self.cache_path.suffix]
            if n := merge_cache_shards(self.cache_path, left, delete=True):
                log.info("merged %d rationales left in cache shards of an earlier run", n)
        threads = max(1, (os.cpu_count() or 1) // num_processes)
        ctx = mp.get_context("spawn")
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(num_processes)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    dev,
                    threads,
                    encoder_factory,
                    self.cache_path,
                    precision,
                    q,
                    self._outbox,
                ),
                daemon=True,
            )
            for r, (dev, q) in enumerate(zip(self.devices, self._inboxes))
        ]
        self._attrs: dict[str, Any] = {}
        self._closed = False
        for p in self._procs:
            p.start()
        try:
            self._collect(range(num_processes), timeout=start_timeout)
        except BaseException:
            self.close()
            raise

    # -- plumbing -------------------------------------------------------------------------------
    def _collect(self, ranks, timeout: float | None = None) -> dict[int, Any]:
        """One reply from each of ``ranks``; a dead worker or an error raises ``WorkerError``."""
        import time

        pending, out, errors = set(ranks), {}, []
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            try:
                status, rank, value = self._outbox.get(timeout=1.0)
            except queue.Empty:  # nothing yet: check the workers are alive, then wait on
                dead = [r for r in pending if not self._procs[r].is_alive()]
                if dead:
                    codes = {r: self._procs[r].exitcode for r in dead}
                    raise WorkerError(
                        f"worker(s) died without replying: exit codes {codes}"
                    ) from None
                if deadline is not None and time.monotonic() > deadline:
                    raise WorkerError(
                        f"no reply from ranks {sorted(pending)} in {timeout} s"
                    ) from None
                continue
            pending.discard(rank)
            if status == "error":
                errors.append(f"rank {rank} ({self.devices[rank]}):\n{value}")
            else:
                out[rank] = value
        if errors:
            raise WorkerError("\n".join(errors))
        return out

    def _ask(self, rank: int, kind: str, payload: Any = None) -> Any:
        self._inboxes[rank].put((kind, payload))
        return self._collect([rank])[rank]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._attrs:
            tag, value = self._ask(0, "getattr", name)
            if tag == "<callable>":

                def call(*args, _name=name, **kwargs):
                    return self._ask(0, "call", (_name, args, kwargs))

                value = call
            self._attrs[name] = value
        return self._attrs[name]

    @property
    def model(self) -> _ModelInfo:
        if "model" not in self._attrs:
            self._attrs["model"] = _ModelInfo(*self._ask(0, "model_info"))
        return self._attrs["model"]

    @property
    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for r in range(self.num_processes):
            for k, v in self._ask(r, "stats")[0].items():
                total[k] = total.get(k, 0) + v
        return total

    @property
    def cache(self):
        return None if self.cache_path is None else _CacheStats(self)

    # -- encode ---------------------------------------------------------------------------------
    def encode(
        self,
        sentences: str | Sequence[str],
        *args: Any,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = False,
        return_rationales: bool = False,
        show_progress_bar: bool | None = None,
        **kwargs: Any,
    ):
        """``GraceEncoder.encode`` over the workers: same arguments, same result, input order."""
        import torch

        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        shards = shard_texts(texts, self.num_processes)
        busy = [r for r, s in enumerate(shards) if s]
        for r in busy:
            kw = dict(kwargs, return_rationales=True, convert_to_numpy=True)
            kw["show_progress_bar"] = bool(show_progress_bar) and r == 0  # one bar
            self._inboxes[r].put(("encode", (shards[r], args, kw)))
        replies = self._collect(busy)
        self.merge_cache()
        vec: dict[str, np.ndarray] = {}
        why: dict[str, str | None] = {}
        for r in busy:
            emb, rationales = replies[r]
            vec.update(zip(shards[r], emb))
            why.update(zip(shards[r], rationales))
        if texts:
            emb = torch.from_numpy(np.stack([vec[t] for t in texts]))
        else:
            emb = torch.empty(0, int(self.model.config.hidden_size))
        rationales = [why[t] for t in texts]
        from grace_lightning.eval.encoder import encode_output

        return encode_output(
            emb,
            rationales,
            single=single,
            normalize_embeddings=normalize_embeddings,
            convert_to_numpy=convert_to_numpy,
            convert_to_tensor=convert_to_tensor,
            return_rationales=return_rationales,
        )

    def merge_cache(self, delete: bool = False) -> int:
        if self.cache_path is None:
            return 0
        shards = [shard_cache_path(self.cache_path, r) for r in range(self.num_processes)]
        return merge_cache_shards(self.cache_path, shards, delete=delete)

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for q, p in zip(self._inboxes, self._procs):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
                p.join()
        self.merge_cache(delete=True)

    def __enter__(self) -> DistributedEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


class _CacheStats:
    """``encoder.cache`` of a DistributedEncoder: summed worker cache counters, and the path."""

    def __init__(self, enc: DistributedEncoder):
        self._enc = enc
        self.path = enc.cache_path

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for r in range(self._enc.num_processes):
            for k, v in (self._enc._ask(r, "stats")[1] or {}).items():
                total[k] = total.get(k, 0) + v
        return total


def encode_distributed(
    encoder_factory: Callable[..., Any],
    texts: str | Sequence[str],
    num_processes: int,
    *,
    devices: Sequence[str] | None = None,
    cache: str | Path | None = None,
    precision: str | None = None,
    **encode_kwargs: Any,
):
    """One ``encode`` call over ``num_processes`` workers (started and stopped here); returns
    what ``GraceEncoder.encode(texts, **encode_kwargs)`` returns."""
    with DistributedEncoder(
        encoder_factory, num_processes, devices=devices, cache=cache, precision=precision
    ) as enc:
        return enc.encode(texts, **encode_kwargs)
