"""A shuffling sampler and data loader that resume mid-epoch in the same data order.

Upstream GRACE trains with verl, whose dataloader is a torchdata ``StatefulDataLoader`` saved
with each checkpoint, so a resumed run continues where it stopped. Lightning 2.x does the same
for any train dataloader that has ``state_dict()`` / ``load_state_dict()``
(``lightning.pytorch.utilities.combined_loader.CombinedLoader._state_dicts``, saved by
``FitLoop.on_save_checkpoint`` under ``"combined_loader"`` and restored in
``FitLoop.setup_data`` before the first batch is drawn). Only the *loader* is asked, not its
sampler, hence :class:`ResumableDataLoader`.

:class:`ResumableSampler`:

- order = ``torch.randperm(n, generator seeded with seed + epoch)``: deterministic per
  (seed, epoch), the same recipe as ``torch.utils.data.DistributedSampler``;
- DDP: whole examples are sharded by rank (``order[rank:usable:world_size]``, the tail that
  does not divide evenly is dropped so every rank runs the same number of steps);
- it subclasses ``DistributedSampler`` so Lightning does not wrap it in its own distributed
  sampler (``_requires_distributed_sampler``), and Lightning's ``set_epoch`` calls reach it;
- ``state_dict()`` holds the epoch and the position (examples of this rank's shard already
  handed out); after ``load_state_dict`` the next pass starts at that position.

The loader counts the batches it actually delivered, which is the right position even when
worker processes have prefetched indices beyond it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger(__name__)


def default_rank_world_size() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when it is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(DistributedSampler):
    """Seeded shuffle per epoch, rank sharding, and a resumable position. See module doc."""

    def __init__(
        self,
        data_source: Sized,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if rank is None or world_size is None:
            default_rank, default_world = default_rank_world_size()
            rank = default_rank if rank is None else rank
            world_size = default_world if world_size is None else world_size
        super().__init__(
            data_source,
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.num_examples = len(data_source)
        self._start = 0  # where the next pass starts (set by load_state_dict)
        self._position = 0  # examples handed out in the current epoch

    @property
    def world_size(self) -> int:
        return self.num_replicas

    def order(self, epoch: int | None = None) -> list[int]:
        """This rank's full index order for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_examples, generator=g).tolist()
        else:
            perm = list(range(self.num_examples))
        usable = (self.num_examples // self.num_replicas) * self.num_replicas
        return perm[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        start, self._start = self._start, 0  # a resume offset applies to one pass only
        self._position = start
        for index in order[start:]:
            self._position += 1
            yield index

    def __len__(self) -> int:
        return self.num_examples // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start, also right after a mid-epoch restore
        with the restored epoch: only a *different* epoch resets the position."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = 0
            self._position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self._position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "world_size": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = int(state["position"])
        saved_world = int(state.get("world_size", self.num_replicas))
        if saved_world != self.num_replicas:
            # the global order only depends on (seed, epoch): re-split what all ranks consumed
            position = position * saved_world // self.num_replicas
            log.warning(
                "Resuming with world size %d (saved with %d): continuing the epoch at "
                "position %d of this rank's shard",
                self.num_replicas,
                saved_world,
                position,
            )
        if (
            state.get("seed", self.seed) != self.seed
            or state.get("num_examples", self.num_examples) != self.num_examples
        ):
            log.warning(
                "Resuming a data order saved with seed=%s, %s examples; now seed=%s, %s "
                "examples: the order after resuming differs from the saved run",
                state.get("seed"),
                state.get("num_examples"),
                self.seed,
                self.num_examples,
            )
        self.epoch = int(state["epoch"])
        self._start = self._position = min(position, len(self))


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose ``state_dict`` Lightning saves
    in checkpoints. The position is counted from batches delivered to the training loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableDataLoader needs sampler=ResumableSampler(...)")
        self._delivered: int | None = None  # examples delivered in the running pass
        self._delivered_epoch: int | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: the sampler pass (and so its epoch) starts at the first next(), which
        # Lightning calls after set_epoch().
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        self._delivered = sampler._start
        self._delivered_epoch = sampler.epoch
        for batch in super().__iter__():
            self._delivered += self.batch_size or 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        state = sampler.state_dict()
        if self._delivered is not None and self._delivered_epoch == sampler.epoch:
            state["position"] = self._delivered
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)  # type: ignore[union-attr]
        self._delivered = None
        self._delivered_epoch = None
