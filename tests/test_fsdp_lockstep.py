"""Rollouts in lockstep across FSDP ranks (issue 17, item 6; ``rollout.engine.rank_sync``).

Under FULL_SHARD every decoder layer's forward all-gathers its shards: a collective each rank
must join, in order. Ranks whose rows hit EOS sooner, or that have fewer sub-batches, must keep
running forwards (one-token "ghost" forwards) while any rank still decodes.

- In one process: a rank whose rows all end at their first token, sampling one sub-batch, runs
  next to a simulated rank that samples 3 sub-batches to ``max_new_tokens``: both issue the same
  sequence of forwards and syncs (what the collectives pair up), and the fast rank's rollouts are
  those it samples alone.
- In 2 gloo processes under ``trainer=fsdp_cpu`` (the real training loop): rank 0's rows all end
  at EOS on their first token, rank 1 ignores EOS and samples in more sub-batches. Before the
  fix this hangs or pairs the wrong collectives (run under a timeout that kills the process
  group); with it training finishes and each rank's first rollouts equal an unsharded model's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from grace_lightning.prompts import ChatPrompter
from grace_lightning.rollout import engine as engine_mod
from grace_lightning.rollout.engine import HFRolloutEngine

from .conftest import DATA_ROOT, ROOT

TEXTS = ["The cat sat on the mat.", "Quantum computers use qubits.", "Paris is in France."]
STEPS = 6


def _eos_bias(model, eos_ids: list[int], value: float):
    """A hook that adds ``value`` to the EOS logits of the LM head (its handle)."""

    def hook(module, args, out):  # (..., V)
        out = out.clone()
        out[..., eos_ids] += value
        return out

    return model.get_output_embeddings().register_forward_hook(hook)


def _eos_at_first_call(model, eos_ids: list[int]):
    """EOS +100 on the LM head's first call only (a rollout's prefill: rows end with their
    first token); the handle."""
    calls = [0]

    def hook(module, args, out):  # (..., V)
        calls[0] += 1
        if calls[0] != 1:
            return out
        out = out.clone()
        out[..., eos_ids] += 100.0
        return out

    return model.get_output_embeddings().register_forward_hook(hook)


def _traced_generate(model, tok, sync, **engine_kw):
    """generate() with ``rank_sync`` -> ``sync``; returns (batch, trace of 'F'orward / 'S'ync)."""
    trace: list[str] = []
    layer0 = model.get_decoder().layers[0]
    handle = layer0.register_forward_pre_hook(lambda m, a: trace.append("F"))
    pr = ChatPrompter(tok)

    def recorded(value: int) -> int:
        trace.append("S")
        return sync(value)

    old = engine_mod.rank_sync
    engine_mod.rank_sync = lambda model, device: recorded
    try:
        engine = HFRolloutEngine(model, tok, max_new_tokens=STEPS, **engine_kw)
        seeds = [11, 12, 13]
        out = engine.generate(pr.encode(TEXTS), [2, 1, 2], 1.0, pr.system_len, seeds=seeds)
    finally:
        engine_mod.rank_sync = old
        handle.remove()
    return out, trace, engine


def test_a_rank_done_early_issues_the_forwards_and_syncs_of_the_slowest(tiny_backbone):
    model, tok = tiny_backbone
    # the slow rank: EOS never sampled, 2 rows a sub-batch (3 sub-batches); alone, its sync
    # returns its own values, which we record as what it contributes to each all-reduce
    slow_values: list[int] = []

    def alone(value: int) -> int:
        slow_values.append(value)
        return value

    slow, slow_trace, slow_engine = _traced_generate(
        model, tok, alone, ignore_eos=True, max_rows_per_batch=2
    )
    assert len(slow_engine.last_plan) == 3 and bool((slow.lengths == STEPS).all())

    # the fast rank: every row ends at its first token (EOS logit +100), one sub-batch
    handle = _eos_bias(model, HFRolloutEngine(model, tok).eos_ids, 100.0)
    try:
        plain, _, _ = _traced_generate(model, tok, lambda v: v)  # alone: its own rollouts
        peer = iter(slow_values)
        fast, fast_trace, fast_engine = _traced_generate(model, tok, lambda v: max(v, next(peer)))
    finally:
        handle.remove()
    assert len(fast_engine.last_plan) == 1 and bool((fast.lengths == 1).all())
    assert next(peer, None) is None  # every all-reduce of the slow rank was joined
    # the same forwards (layer all-gathers) and syncs, in the same order
    assert fast_trace == slow_trace
    assert fast_trace.count("F") == 1 + 3 * (1 + STEPS)  # prefix + 3 x (prefill + decode)
    # the ghost forwards change nothing this rank returns
    assert torch.equal(fast.response_ids, plain.response_ids)
    torch.testing.assert_close(fast.pooled, plain.pooled, atol=0, rtol=0)


def test_no_sync_without_sharded_fsdp(tiny_backbone):
    model, _ = tiny_backbone
    assert engine_mod.rank_sync(model, torch.device("cpu")) is None  # no process group


ENTRY = textwrap.dedent(
    """
    # train.py with rank 0's rows ending at their first token and rank 1 ignoring EOS in
    # sub-batches of 3 rows; each rank saves its first generate() call (inputs and outputs)
    import os, torch
    from grace_lightning.module import GraceModule
    from grace_lightning.rollout.engine import HFRolloutEngine

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    out_dir = os.environ["LOCKSTEP_OUT"]
    rollout, generate = GraceModule.rollout, HFRolloutEngine.generate

    def patched_rollout(self, batch):
        if not getattr(self, "_lockstep_patched", False):  # once, before the first rollout
            self._lockstep_patched = True
            if rank == 0:  # the LM head's 1st call (the prefill) makes every row end at token 0
                eos, calls = self.engine.eos_ids, [0]
                def bias(module, inputs, out):
                    calls[0] += 1
                    if calls[0] != 1:
                        return out
                    out = out.clone()
                    out[..., eos] += 100.0
                    return out
                self.policy.get_output_embeddings().register_forward_hook(bias)
            else:
                self.engine.ignore_eos = True
                self.engine.max_rows_per_batch = 3
        return rollout(self, batch)

    calls = []

    def recording(self, prompt_ids, num_samples=1, temperature=1.0, system_len=0,
                  generator=None, seeds=None, progress=None):
        out = generate(self, prompt_ids, num_samples, temperature, system_len, generator,
                       seeds, progress)
        if not calls:
            torch.save(dict(
                prompt_ids=prompt_ids, num_samples=num_samples, temperature=temperature,
                system_len=system_len, seeds=seeds, sub_batches=len(self.last_plan),
                engine=dict(max_new_tokens=self.max_new_tokens, top_p=self.top_p,
                            top_k=self.top_k, ignore_eos=self.ignore_eos,
                            max_rows_per_batch=self.max_rows_per_batch,
                            max_kv_tokens=self.max_kv_tokens,
                            share_prompt_kv=self.share_prompt_kv,
                            share_prefix=self.share_prefix),
                response_ids=out.response_ids, response_mask=out.response_mask,
                pooled=out.pooled, device=str(next(self.model.parameters()).device),
            ), f"{out_dir}/rank{rank}.pt")
        calls.append(1)
        return out

    GraceModule.rollout = patched_rollout
    HFRolloutEngine.generate = recording
    # train.py as __main__ (Hydra finds conf/ from its file); sys.argv[0] stays this file,
    # which Lightning relaunches for rank 1 (runpy.run_path would swap argv[0] for train.py)
    train_py = os.environ["GRACE_TRAIN_PY"]
    code = compile(open(train_py).read(), train_py, "exec")
    exec(code, {"__name__": "__main__", "__file__": train_py})
    """
)

CLI = [
    "experiment=none",
    "backbone=tiny",
    "reward=sup",
    "logger=none",
    "trainer=fsdp_cpu",
    "trainer.max_steps=2",
    "data=shared",
    f"data.root={DATA_ROOT}",
    "data.max_examples=64",
    "data.prompts_per_step=4",  # 2 a rank (global sizes; per rank before issue 17)
    "algo.prompts_per_minibatch=2",
    "rollout.num_generations=3",
    f"rollout.max_new_tokens={STEPS}",
    "prompt.max_prompt_tokens=96",
    "reward.truncation=off",
    "trainer.enable_progress_bar=false",
]


def test_fsdp_cpu_ranks_finishing_at_different_steps_train_and_sample_right(tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        LOCKSTEP_OUT=str(tmp_path),
        GRACE_TRAIN_PY=str(ROOT / "train.py"),
    )
    cmd = [sys.executable, str(entry), *CLI, f"hydra.run.dir={tmp_path / 'run'}"]
    # its own session: on a timeout the whole process group (rank 1 too) is killed
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail("2-process FSDP run hung (ranks out of lockstep):\n" + log[-4000:])
    assert proc.returncode == 0, log[-6000:]

    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    model, tok = load_backbone(BackboneConfig(name="tiny", source="tiny"))  # the run's start
    model.eval()
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # the scenario: rank 0 stops after one token in one sub-batch, rank 1 runs to the end in more
    # (1-token responses: the loss pass still runs its response forward, rl/policy.py)
    assert bool((got[0]["response_mask"].sum(-1) == 1).all()) and got[0]["sub_batches"] == 1
    assert bool((got[1]["response_mask"].sum(-1) == STEPS).all()) and got[1]["sub_batches"] > 1
    for rank, rec in enumerate(got):
        assert rec["device"] == "cpu"
        engine = HFRolloutEngine(model, tok, **rec["engine"])
        handle = _eos_at_first_call(model, engine.eos_ids) if rank == 0 else None
        try:
            want = engine.generate(
                rec["prompt_ids"],
                rec["num_samples"],
                rec["temperature"],
                rec["system_len"],
                seeds=rec["seeds"],
            )
        finally:
            if handle is not None:
                handle.remove()
        # sharded weights gathered for the right layer at every step: the unsharded model's
        # rollouts (same per-row seeds, same sub-batches)
        assert torch.equal(rec["response_ids"], want.response_ids), f"rank {rank}"
        torch.testing.assert_close(rec["pooled"], want.pooled, atol=1e-5, rtol=1e-4)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
