"""Shared bench helpers: the machine (CPU model, ISA flags), matmul throughput, FLOP counts.

- :func:`cpu_info` reads ``/proc/cpuinfo`` (model name, AMX / AVX-512 flags); :func:`parse_cpuinfo`
  does the parsing, so it is testable on a canned text.
- :func:`matmul_throughput` times ``torch.matmul`` on representative shapes (the model's linear
  layers at decode and at prefill/update batch sizes) in fp32 or bf16, on this process's threads.
- :class:`ModelShape` + :func:`forward_flops` (grace_lightning/flops.py, re-exported here) count a forward pass's matrix FLOPs from the
  model's shape and token counts: ``2 * (linear params) * tokens`` for the projections and MLP,
  ``2 * 2 * heads * head_dim * (query, key) pairs`` for attention (QK^T and AV), and the LM head
  only where logits are computed. Backward is counted as 2x forward. Element-wise work (norms,
  RoPE, softmax, sampling) is not counted: this is the matmul roofline.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from grace_lightning.flops import (  # noqa: F401  (re-exported: the benches import them from here)
    ModelShape,
    causal_pairs,
    decode_flops,
    forward_flops,
    grace_step_flops,
    matmul_gflops,
    prefill_flops,
    sequences_flops,
)

ISA_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512f", "avx2")


# ----------------------------------------------------------------------------- machine
def parse_cpuinfo(text: str) -> dict:
    """``{"model": str, "flags": [ISA flags present], "cores": logical CPUs}`` from cpuinfo text."""
    model, flags, cores = None, set(), 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "processor":
            cores += 1
        elif key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {
        "model": model or platform.processor() or "unknown CPU",
        "flags": [f for f in ISA_FLAGS if f in flags],
        "cores": cores,
    }


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """This machine's CPU model and ISA flags (Linux; elsewhere the flags list is empty)."""
    try:
        info = parse_cpuinfo(Path(path).read_text())
    except OSError:
        info = parse_cpuinfo("")
    info["cores"] = info["cores"] or os.cpu_count()
    return info


def has_amx_bf16(info: dict | None = None) -> bool:
    return "amx_bf16" in (info or cpu_info())["flags"]


def describe_cpu(info: dict | None = None) -> str:
    info = info or cpu_info()
    flags = ", ".join(info["flags"]) or "none of " + ", ".join(ISA_FLAGS)
    return f"{info['model']} ({info['cores']} logical CPUs; ISA: {flags})"


def peak_rss_gb() -> float:
    """This process's peak resident set size, GB (2**30 bytes; Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ----------------------------------------------------------------------------- model shape / FLOPs
# ModelShape, forward_flops, ..., grace_step_flops, matmul_gflops: grace_lightning/flops.py (the
# startup step-time estimate uses them too), re-exported above; the baselines' counts stay here.
def trl_step_flops(shape: ModelShape, policy: list[int], anchors: list[int], k: int, r: int):
    """TRL GRPOTrainer + GRACE reward at the same shape: every row prefills its own prompt
    (``model.generate`` on repeated prompts), the reward re-generates each anchor and re-encodes
    every sequence (no logits), and the loss pass runs full sequences with logits on responses."""
    rows = [p for p in policy for _ in range(k)]
    generate = prefill_flops(shape, rows, "last") + decode_flops(shape, rows, r)
    reward = prefill_flops(shape, anchors, "last") + decode_flops(shape, anchors, r)
    reward += sequences_flops(shape, rows + anchors, r, "none")
    fwd = forward_flops(
        shape,
        sum(p + r for p in rows),
        sum(causal_pairs(p + r) for p in rows),
        len(rows) * r,
    )
    return {"rollout": generate, "reward": reward, "update": 3 * fwd}


def reference_step_flops(shape: ModelShape, policy: list[int], anchors: list[int], k: int, r: int):
    """Bare reference: one ``model.generate`` over repeated policy prompts + anchors, then one
    full-sequence forward/backward over the policy rows (logits at the response positions)."""
    rows = [p for p in policy for _ in range(k)]
    generate = prefill_flops(shape, rows + anchors, "last") + decode_flops(shape, rows + anchors, r)
    fwd = forward_flops(
        shape, sum(p + r for p in rows), sum(causal_pairs(p + r) for p in rows), len(rows) * r
    )
    return {"rollout": generate, "update": 3 * fwd}


# ----------------------------------------------------------------------------- matmul throughput
def matmul_shapes(
    shape: ModelShape, rows: int, tokens: int
) -> dict[str, list[tuple[int, int, int]]]:
    """(M, K, N) matmuls of the model at decode (M = rows) and prefill/update (M = tokens) size."""
    d, f, v = shape.hidden, shape.intermediate, shape.vocab
    q = shape.heads * shape.head_dim
    return {
        "decode": [(rows, d, q), (rows, d, f), (rows, f, d), (rows, d, v)],
        "update": [(tokens, d, q), (tokens, d, f), (tokens, f, d), (tokens, d, v)],
    }


def matmul_throughput(
    shape: ModelShape, rows: int, tokens: int, dtypes=("float32", "bfloat16"), min_seconds=0.25
) -> dict[str, dict[str, float]]:
    """``{dtype: {"decode": GFLOP/s, "update": GFLOP/s, "peak": GFLOP/s}}``: FLOP-weighted
    throughput over the phase's matmul shapes (time-weighted, as the phase would see it), and the
    best single shape. Runs on this process's torch threads."""
    import torch

    out: dict[str, dict[str, float]] = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        res: dict[str, float] = {}
        best = 0.0
        for phase, mats in matmul_shapes(shape, rows, tokens).items():
            flops = seconds = 0.0
            for m, k, n in mats:
                g = matmul_gflops(m, k, n, dtype, min_seconds)
                best = max(best, g)
                flops += 2 * m * k * n
                seconds += 2 * m * k * n / (g * 1e9)
            res[phase] = flops / seconds / 1e9
        res["peak"] = best
        out[name] = res
    return out
