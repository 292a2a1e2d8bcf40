"""``GraceDataModule``: GRACE's training data as raw texts for the policy's rollouts.

Mirrors the upstream data pipeline (GasolSun36/GRACE ``process_data.py`` +
``offline_filter_data.py``; paper notes §4):

1. read the supervised triplets (``query``/``positive``/``negative``) or the unsupervised
   sentences, optionally only the first ``max_examples`` (upstream ``--max_samples``);
2. hold out the FIRST ``int(n * val_fraction)`` examples, unshuffled, as validation
   (upstream ``--test_ratio 0.01``);
3. drop examples whose chat-templated POLICY prompt is longer than ``max_prompt_tokens``
   (upstream 1024, counted with the policy's tokenizer, on both splits). The policy prompt
   is the positive in supervised mode (upstream "main") and the sentence in unsupervised
   mode; queries and negatives are not filtered (upstream right-truncates them).

Steps 1-2 run in :meth:`GraceDataModule.load` without a tokenizer, so ``train.py`` can fail
fast on bad data before a model loads; step 3 runs when the caller hands a token counter to
:meth:`GraceDataModule.filter_by_length`.

Storage (paper scale, :mod:`grace_lightning.data.store`): a data file is validated once into a
memory-mapped Arrow store under ``cache_dir`` (default ``$GRACE_CACHE/data/arrow``), keyed by
the file's identity and the reading options; the prompt lengths are a cached ``datasets.map``
keyed by the tokenizer and prompt. A restart, or every rank of a DDP run, opens those files
instead of re-reading and re-tokenising (the first process builds under a file lock, the
others wait for it). ``train_examples`` / ``val_examples`` are read-only sequences over the
store (:class:`ExampleView`); the splits and the length filter are index arrays.

Batches are raw strings: ``{"query": [...], "positive": [...], "negatives": [[...], ...]}``
(sup) or ``{"text": [...]}`` (unsup), ``prompts_per_step / world_size`` examples each on each
rank (``prompts_per_step`` is GLOBAL, as verl's ``train_batch_size``), shuffled by a resumable,
rank-sharded sampler (:mod:`grace_lightning.data.sampler`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from grace_lightning.data.offline import data_cache_dir, ensure_offline_default
from grace_lightning.data.readers import (
    DataError,
    ReadReport,
    Triplet,
    _check_file,
    iter_sentences,
    iter_triplets,
    load_hub_sentences,
    load_hub_triplets,
)
from grace_lightning.data.sampler import (
    ResumableDataLoader,
    ResumableSampler,
    default_rank_world_size,
)
from grace_lightning.data.store import cached_lengths, file_identity, open_store

log = logging.getLogger(__name__)

MODES = {"sup": "sup", "supervised": "sup", "unsup": "unsup", "unsupervised": "unsup"}
KINDS = ("jsonl", "txt", "hub", "offline")
# keys a source spec may have (anything else is a typo and an error)
SOURCE_KEYS = {
    "kind",
    "path",
    "format",
    "query_field",
    "positive_field",
    "negative_field",
    "text_field",
    "hub_id",
    "name",
    "split",
    "load_kwargs",
}


class ExampleView(Sequence):
    """Read-only examples (``Triplet`` for sup, ``str`` for unsup) at ``indices`` of an Arrow
    dataset; nothing is copied into Python objects until an item is read."""

    def __init__(self, dataset, indices: np.ndarray, mode: str) -> None:
        self.dataset, self.indices, self.mode = dataset, np.asarray(indices, np.int64), mode

    def __len__(self) -> int:
        return len(self.indices)

    def _convert(self, row: dict[str, Any]) -> Triplet | str:
        if self.mode == "sup":
            return Triplet(row["query"], row["positive"], list(row["negatives"]))
        return row["text"]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._convert(self.dataset[int(self.indices[index])])

    def __iter__(self):
        for start in range(0, len(self), 1024):
            chunk = self.dataset[self.indices[start : start + 1024].tolist()]
            cols = list(chunk)
            for values in zip(*(chunk[c] for c in cols)):
                yield self._convert(dict(zip(cols, values)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, ExampleView)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"ExampleView({len(self)} {self.mode} examples)"


class ListDataset(Dataset):
    """A map-style dataset over a sequence of examples (a list or an :class:`ExampleView`)."""

    def __init__(self, examples: Sequence[Any]) -> None:
        self.examples = examples if isinstance(examples, ExampleView) else list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Any:
        return self.examples[index]


def collate_triplets(batch: list[Triplet]) -> dict[str, list]:
    return {
        "query": [t.query for t in batch],
        "positive": [t.positive for t in batch],
        "negatives": [list(t.negatives) for t in batch],
    }


def collate_sentences(batch: list[str]) -> dict[str, list[str]]:
    return {"text": list(batch)}


def policy_text(example: Triplet | str) -> str:
    """The text the policy writes a rationale for: the positive (sup) or the sentence."""
    return example.positive if isinstance(example, Triplet) else example


def _plain(obj: Any) -> Any:
    """DictConfig/ListConfig (or any mapping) -> plain dict/list, recursively."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj


class GraceDataModule(LightningDataModule):
    """GRACE training data (see module doc). All arguments come from ``conf/data/*.yaml``.

    Args:
        mode: ``sup`` (triplets) or ``unsup`` (sentences); only that source is read.
        sup / unsup: source specs: ``kind`` (``jsonl`` | ``txt`` | ``hub`` | ``offline``),
            ``path`` (relative paths resolve against ``root``), field names
            (``query_field``, ``positive_field``, ``negative_field`` -- null for none --,
            ``text_field``), ``format`` (sentences: auto | txt | jsonl), and for ``hub``:
            ``hub_id``, ``name`` (config), ``split``, ``load_kwargs``.
        root: data root for relative paths (default: the current directory).
        on_error: ``raise`` on the first bad line, or ``skip`` bad lines and report counts.
        max_examples: read only the first N valid examples (None: all).
        val_fraction: the first ``int(n * val_fraction)`` examples, unshuffled, are held out
            (paper/upstream 0.01).
        prompts_per_step: policy prompts per rollout batch over ALL ranks (upstream / verl
            ``train_batch_size=64`` over all GPUs); each rank's train dataloader takes
            ``prompts_per_step / world_size`` (:meth:`per_rank_batch`; must divide).
        max_prompt_tokens: keep examples whose chat-templated policy prompt has at most this
            many tokens (paper/upstream 1024); applied by :meth:`filter_by_length`. None or 0
            disables it.
        seed: shuffling seed (the order is a function of seed and epoch only).
        num_workers: DataLoader worker processes (0: load in the main process).
        rank / world_size: DDP sharding; default from the Trainer, else torch.distributed.
        val_batch_size: validation batch size per rank (default ``per_rank_batch()``).
        cache_dir: where the Arrow stores and cached prompt lengths live (default
            ``$GRACE_CACHE/data/arrow``).
    """

    def __init__(
        self,
        mode: str = "sup",
        sup: Mapping[str, Any] | None = None,
        unsup: Mapping[str, Any] | None = None,
        root: str | Path | None = None,
        on_error: str = "raise",
        max_examples: int | None = None,
        val_fraction: float = 0.01,
        prompts_per_step: int = 8,
        max_prompt_tokens: int | None = 1024,
        seed: int = 0,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        val_batch_size: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"data.mode={mode!r}: use 'sup' or 'unsup'")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error={on_error!r}: use 'raise' or 'skip'")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
        if int(prompts_per_step) < 1:
            raise ValueError(f"data.prompts_per_step={prompts_per_step}: must be >= 1")
        self.mode = MODES[mode]
        self.sources = {
            "sup": _plain(sup) if sup is not None else {"kind": "offline"},
            "unsup": _plain(unsup) if unsup is not None else {"kind": "offline"},
        }
        self.root = Path(root) if root is not None else None
        self.on_error = on_error
        self.max_examples = max_examples
        self.val_fraction = float(val_fraction)
        self.prompts_per_step = int(prompts_per_step)
        self.max_prompt_tokens = max_prompt_tokens
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.rank = rank
        self.world_size = world_size
        self.val_batch_size = int(val_batch_size) if val_batch_size else None
        self.cache_dir = Path(cache_dir) if cache_dir else data_cache_dir() / "arrow"

        self.dataset = None  # the whole (validated) source as an Arrow dataset
        self._train_idx = np.zeros(0, np.int64)
        self._val_idx = np.zeros(0, np.int64)
        self.train_examples: Sequence[Any] = []
        self.val_examples: Sequence[Any] = []
        self.read_report: ReadReport | None = None
        self.length_report: dict[str, Any] | None = None
        self._loaded = False

    # ------------------------------------------------------------------ reading

    def resolve_path(self, path: str | Path) -> Path:
        """Relative paths are taken relative to ``root`` (when set)."""
        p = Path(path).expanduser()
        if not p.is_absolute() and self.root is not None:
            p = self.root.expanduser() / p
        return p

    def _source_spec(self) -> dict[str, Any]:
        spec = dict(self.sources[self.mode])
        unknown = set(spec) - SOURCE_KEYS
        if unknown:
            raise ValueError(
                f"data.{self.mode}: unknown keys {sorted(unknown)}; allowed: {sorted(SOURCE_KEYS)}"
            )
        kind = spec.get("kind", "jsonl" if self.mode == "sup" else "txt")
        if kind not in KINDS:
            raise ValueError(f"data.{self.mode}.kind={kind!r}: use one of {KINDS}")
        if kind == "txt" and self.mode == "sup":
            raise ValueError("data.sup.kind=txt: supervised triplets need jsonl, hub or offline")
        if kind in ("jsonl", "txt") and not spec.get("path"):
            raise ValueError(f"data.{self.mode}.path is required for kind={kind}")
        if kind == "hub" and not spec.get("hub_id"):
            raise ValueError(f"data.{self.mode}.hub_id is required for kind=hub")
        spec["kind"] = kind
        return spec

    def open_dataset(self):
        """``(dataset, report)``: the configured source of the current mode, validated, as an
        Arrow dataset (files: the memory-mapped store, built on first use; Hub: in memory)."""
        import datasets

        spec = self._source_spec()
        kind = spec["kind"]
        common = dict(on_error=self.on_error, max_examples=self.max_examples)
        if kind == "hub":
            hub = dict(
                name=spec.get("name"),
                split=spec.get("split", "train"),
                **common,
                **(spec.get("load_kwargs") or {}),
            )
            if self.mode == "sup":
                items, report = load_hub_triplets(spec["hub_id"], **_triplet_fields(spec), **hub)
                cols = {
                    "query": [t.query for t in items],
                    "positive": [t.positive for t in items],
                    "negatives": [t.negatives for t in items],
                }
            else:
                items, report = load_hub_sentences(
                    spec["hub_id"], text_field=spec.get("text_field", "text"), **hub
                )
                cols = {"text": items}
            return datasets.Dataset.from_dict(cols), report
        if kind == "offline":
            path = ensure_offline_default()[self.mode]
        else:
            path = self.resolve_path(spec["path"])
        if self.mode == "sup":
            fields = _triplet_fields(spec)

            def read(report: ReadReport):
                return iter_triplets(path, report, **fields, **common)
        else:
            fields = {
                "format": spec.get("format") or {"txt": "txt", "jsonl": "jsonl"}.get(kind, "auto"),
                "text_field": spec.get("text_field", "text"),
            }

            def read(report: ReadReport):
                return iter_sentences(path, report, **fields, **common)

        # a missing/odd file fails here, with the readers' messages, before any store exists
        identity = file_identity(_check_file(path))
        key = {"kind": kind, **identity, **fields, **common}
        ds, report, built = open_store(self.cache_dir, key, self.mode, read, source=str(path))
        if not built:
            log.info("data: opened the stored %s (%d examples)", path, len(ds))
        return ds, report

    def load(self) -> None:
        """Read, validate and split (no tokenizer needed). Raises :class:`DataError` on bad
        data. Safe to call more than once."""
        if self._loaded:
            return
        ds, report = self.open_dataset()
        self.read_report = report
        if report.skipped:
            log.warning("data: %s; first problems: %s", report.summary(), report.messages)
        else:
            log.info("data: %s", report.summary())
        n = len(ds)
        n_val = int(n * self.val_fraction)  # upstream split_dataset(): the first 1 %
        if n - n_val <= 0:
            raise DataError(
                f"{report.source}: no training examples left after holding out {n_val} for "
                f"validation",
                source=report.source,
            )
        self.dataset = ds
        self._set_split(np.arange(n_val, n), np.arange(n_val))
        self._loaded = True
        log.info("data (%s): %d train, %d val examples", self.mode, n - n_val, n_val)

    def _set_split(self, train_idx: np.ndarray, val_idx: np.ndarray) -> None:
        self._train_idx, self._val_idx = train_idx, val_idx
        self.train_examples = ExampleView(self.dataset, train_idx, self.mode)
        self.val_examples = ExampleView(self.dataset, val_idx, self.mode)

    def filter_by_length(
        self,
        count_tokens: Callable[[list[str]], list[int]],
        max_tokens: int | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """Keep examples whose policy prompt has at most ``max_tokens`` tokens (default
        ``max_prompt_tokens``), on both splits, as upstream ``offline_filter_data.py``.

        ``count_tokens`` maps raw policy texts to the token counts of their chat-templated
        prompts (system prompt + text, generation prompt added); the caller builds it from
        the policy tokenizer. ``key`` names what ``count_tokens`` depends on (tokenizer, chat
        template, system prompt): with it the counts are cached next to the data store and
        later calls with the same key do not call ``count_tokens`` at all. Returns (and
        stores in ``length_report``) kept/dropped counts.
        """
        self.load()
        limit = self.max_prompt_tokens if max_tokens is None else max_tokens
        report: dict[str, Any] = {"max_tokens": limit}
        if not limit:
            report.update(dropped_train=0, dropped_val=0, disabled=True)
            self.length_report = report
            return report
        column = "positive" if self.mode == "sup" else "text"
        lengths = cached_lengths(self.dataset, column, count_tokens, key)  # (n,) every row
        kept = {}
        for split, idx in (("train", self._train_idx), ("val", self._val_idx)):
            counts = lengths[idx]
            kept[split] = idx[counts <= limit]
            report[f"kept_{split}"] = len(kept[split])
            report[f"dropped_{split}"] = len(idx) - len(kept[split])
            report[f"max_tokens_seen_{split}"] = int(counts.max()) if len(counts) else 0
        self.length_report = report
        log.info(
            "data: length filter (<= %d prompt tokens) dropped %d train and %d val examples",
            limit,
            report["dropped_train"],
            report["dropped_val"],
        )
        if not len(kept["train"]):
            raise DataError(
                f"no training example has a policy prompt of <= {limit} tokens "
                f"(longest seen: {report['max_tokens_seen_train']})"
            )
        self._set_split(kept["train"], kept["val"])
        return report

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def _rank_world_size(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            rank = trainer.global_rank if rank is None else rank
            world = trainer.world_size if world is None else world
        if rank is None or world is None:
            default_rank, default_world = default_rank_world_size()
            rank = default_rank if rank is None else rank
            world = default_world if world is None else world
        return int(rank), int(world)

    def per_rank_batch(self, world: int | None = None) -> int:
        """Policy prompts per rollout batch on each rank: the global ``prompts_per_step``
        divided by the world size (config.py checks the division at startup)."""
        if world is None:
            world = self._rank_world_size()[1]
        if self.prompts_per_step % world:
            raise DataError(
                f"data.prompts_per_step={self.prompts_per_step} is global and {world} ranks "
                f"cannot split it evenly: set it to a multiple of {world}"
            )
        return self.prompts_per_step // world

    def _collate(self) -> Callable[[list[Any]], dict[str, list]]:
        return collate_triplets if self.mode == "sup" else collate_sentences

    def train_dataloader(self) -> ResumableDataLoader:
        self.load()
        rank, world = self._rank_world_size()
        dataset = ListDataset(self.train_examples)
        sampler = ResumableSampler(dataset, seed=self.seed, rank=rank, world_size=world)
        per_rank = self.per_rank_batch(world)
        if len(sampler) < per_rank:
            raise DataError(
                f"{len(self.train_examples)} training examples give {len(sampler)} per device "
                f"(world size {world}), fewer than prompts_per_step={self.prompts_per_step} / "
                f"{world} = {per_rank}: no full batch"
            )
        return ResumableDataLoader(
            dataset,
            batch_size=per_rank,
            sampler=sampler,
            drop_last=True,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """The held-out first ``val_fraction`` in file order; ``[]`` (no validation) when
        empty. Under DDP Lightning shards it with its own non-shuffling sampler."""
        self.load()
        if not self.val_examples:
            return []
        return DataLoader(
            ListDataset(self.val_examples),
            batch_size=self.val_batch_size or self.per_rank_batch(),
            shuffle=False,
            drop_last=False,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
        )


def _triplet_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
    return dict(
        query_field=spec.get("query_field", "query"),
        positive_field=spec.get("positive_field", "positive"),
        negative_field=spec.get("negative_field", "negative"),
    )
