"""Test-only hooks that subprocess runs of ``train.py`` load through Hydra overrides.

- ``model._target_=tests.probes.RecordingGraceModule`` with ``GRACE_PROBE_DIR=<dir>``: every rank
  writes, per rollout batch, the policy texts, rationales, reward terms and advantages it
  trained on (``rank<r>_step<s>.pt``), and its final weights (``rank<r>_final.pt``);
  ``tests.probes.MiniBatchRecordingModule`` adds the groups of each of the rank's mini-batches.
- ``+callbacks.stall._target_=tests.probes.StallAt +callbacks.stall.step=<n>
  +callbacks.stall.marker=<file>``: once a rollout batch has reached global step n (its table
  rows written, its checkpoint NOT yet: checkpoint callbacks run last), touch ``marker`` and
  sleep, so a test can ``kill -9`` the run at a known point. Once: with ``marker`` present
  (the same command run again) it does nothing.
- ``LiveTensorBytes``: a deterministic peak-memory probe for in-process tests (tensor storages
  created inside a ``with`` block), used where RSS would be too noisy to assert a margin.
"""

from __future__ import annotations

import os
import time
import weakref
from pathlib import Path

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from grace_lightning.module import GraceModule


class RecordingGraceModule(GraceModule):
    def _probe_dir(self) -> Path:
        path = Path(os.environ["GRACE_PROBE_DIR"])
        path.mkdir(parents=True, exist_ok=True)
        return path

    def training_step(self, batch, batch_idx):
        self._record = {"step": int(self.global_step), "texts": list(self.policy_texts(batch))}
        out = super().training_step(batch, batch_idx)
        name = f"rank{self.global_rank}_step{self._record['step']:04d}.pt"
        torch.save(self._record, self._probe_dir() / name)
        return out

    def compute_rewards(self, policy_emb, anchors, **text):  # text: a term reads texts
        terms = super().compute_rewards(policy_emb, anchors, **text)
        self._record["terms"] = {k: v.detach().cpu() for k, v in terms.items()}
        self._record["policy_emb"] = policy_emb.detach().cpu()
        self._record["anchors"] = {k: v.detach().cpu() for k, v in anchors.items()}
        return terms

    def update(self, ro, advantages, loss_weight):
        self._record["advantages"] = advantages.detach().cpu()
        self._record["rationales"] = ro.response_texts(self.tokenizer)
        return super().update(ro, advantages, loss_weight)

    def on_train_end(self):
        weights = {n: p.detach().cpu() for n, p in self.policy.named_parameters()}
        torch.save(weights, self._probe_dir() / f"rank{self.global_rank}_final.pt")


class MiniBatchRecordingModule(RecordingGraceModule):
    """RecordingGraceModule + ``minibatch_groups``: the number of groups in each of this rank's
    mini-batches (one optimiser step each) of the rollout batch."""

    def update(self, ro, advantages, loss_weight):
        from grace_lightning.rl import update as update_mod

        sizes = self._record.setdefault("minibatch_groups", [])
        original = update_mod.PolicyUpdater.step

        def step(updater, ro_, groups, *args, **kwargs):
            sizes.append(len(groups))
            return original(updater, ro_, groups, *args, **kwargs)

        update_mod.PolicyUpdater.step = step
        try:
            return super().update(ro, advantages, loss_weight)
        finally:
            update_mod.PolicyUpdater.step = original


class StallAt(L.Callback):
    def __init__(self, step: int, marker: str):
        self.step, self.marker = int(step), Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and not self.marker.exists():  # once: a rerun runs
            self.marker.touch()
            time.sleep(3600)  # the test kills us here


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created by aten ops inside the ``with`` block.

    Every op output (forward and backward; autograd runs them on this thread's dispatch modes)
    adds its storage's bytes until the storage is freed. Tensors that existed before (weights)
    are not counted, nor are views and in-place results of an op's inputs (``weight.t()`` in
    every ``linear`` would otherwise count each weight once, for good); gradients written
    during backward are. Scratch memory inside a single kernel is not seen. Deterministic,
    unlike RSS, so a margin can be asserted without flakes.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self._sizes and key not in inputs:
                    self._sizes[key] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
