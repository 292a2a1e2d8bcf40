"""Evaluation over several processes (grace_lightning/eval/distributed.py) equals one process.

Two spawned CPU workers on the tiny random backbone: same rationales (token for token) and the
same vectors (within float rounding of different batch shapes) as a single-process
``GraceEncoder.encode``; the workers' cache shards end up merged into the main SQLite file, and a
later single-process encoder on that file generates nothing.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from grace_lightning.eval.distributed import (
    DistributedEncoder,
    encode_distributed,
    merge_cache_shards,
    shard_cache_path,
    shard_texts,
)
from grace_lightning.eval.encoder import GraceEncoder

TINY = {"name": "tiny", "source": "tiny"}
TEXTS = [
    "A man is playing a guitar.",
    "The cat sits on the mat.",
    "A man is playing a guitar.",  # a duplicate: generated once, returned twice
    "Stocks fell sharply on Monday after the announcement.",
    "Two dogs run through a field of tall grass near the river.",
    "She reads.",
    "The committee postponed the vote until next week.",
]


def factory(mode: str):
    return partial(
        GraceEncoder.from_backbone, TINY, mode=mode, generation={"max_new_tokens": 6, "seed": 3}
    )


def test_shards_are_deterministic_disjoint_and_cover():
    shards = shard_texts(TEXTS, 3)
    assert shards == shard_texts(list(TEXTS), 3)
    flat = [t for s in shards for t in s]
    assert sorted(flat) == sorted(set(TEXTS))  # each distinct text exactly once
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_two_processes_equal_one(tmp_path):
    single = factory("rationale")(device="cpu")
    ref, ref_why = single.encode(TEXTS, batch_size=3, return_rationales=True)
    cache = tmp_path / "rationales.sqlite"
    vecs, why = encode_distributed(
        factory("rationale"), TEXTS, 2, cache=cache, batch_size=2, return_rationales=True
    )
    assert vecs.shape == ref.shape and vecs.dtype == np.float32
    assert why == ref_why and all(w is not None for w in why)  # token for token
    np.testing.assert_allclose(vecs, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(vecs[0], vecs[2])  # duplicate text, same vector
    # shards merged into the main file and removed; a later encoder on it generates nothing
    assert not shard_cache_path(cache, 0).exists() and not shard_cache_path(cache, 1).exists()
    warm = factory("rationale")(device="cpu")
    warm.cache = _cache(cache)
    again = warm.encode(TEXTS, batch_size=4)
    assert warm.stats["generated"] == 0 and warm.stats["cached"] == len(set(TEXTS))
    np.testing.assert_allclose(again, vecs, rtol=0, atol=0)


def _cache(path):
    from grace_lightning.eval.cache import RationaleCache

    return RationaleCache(path)


def test_pool_serves_several_calls_and_reads_attributes(tmp_path):
    cache = tmp_path / "r.sqlite"
    with DistributedEncoder(factory("rationale"), 2, cache=cache) as enc:
        assert enc.mode == "rationale" and len(enc.fingerprint) == 64
        assert enc.model.config.hidden_size == 64
        assert sum(p.numel() for p in enc.model.parameters()) > 0
        from grace_lightning.eval.mteb_model import GraceMTEBModel  # what eval.py wraps it in

        meta = GraceMTEBModel(enc).mteb_model_meta
        assert meta.embed_dim == 64 and meta.revision == enc.fingerprint[:12]
        one = enc.encode(TEXTS[0])  # a single string gives a 1-D vector
        assert one.shape == (64,)
        unit = enc.encode(TEXTS[:4], normalize_embeddings=True)
        np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-5)
        assert enc.stats["generated"] == 3  # TEXTS[0] came from the cache the second time
        assert enc.cache.stats()["hits"] >= 1
        # base mode through the same workers equals one process's base mode
        base = enc.encode(TEXTS, mode="base", batch_size=2)
        ref = factory("base")(device="cpu").encode(TEXTS, batch_size=3)
        np.testing.assert_allclose(base, ref, rtol=1e-4, atol=1e-5)
    assert len(_cache(cache)) == 3


def test_leftover_shard_is_merged(tmp_path):
    from grace_lightning.eval.cache import CachedRationale

    main, shard = tmp_path / "c.sqlite", shard_cache_path(tmp_path / "c.sqlite", 0)
    entry = CachedRationale("why", [1, 2], True, np.ones(4, dtype=np.float32))
    _cache(shard).put_many({"k1": ("text", entry)})  # a killed run's shard
    assert merge_cache_shards(main, [shard], delete=True) == 1
    assert not shard.exists()
    got = _cache(main).get_many(["k1"])["k1"]
    assert got.rationale == "why" and got.response_ids == [1, 2]


def test_bf16_autocast_shim_changes_numerics_and_cache_key(tiny_backbone):
    import torch

    from grace_lightning.eval.distributed import with_autocast

    model, tok = tiny_backbone
    fp32 = GraceEncoder(model, tok, mode="base")
    bf16 = GraceEncoder(model, tok, mode="base")
    encode = with_autocast(bf16, "bf16")
    a, b = fp32.encode(TEXTS), encode(TEXTS)
    assert not np.array_equal(a, b)  # autocast was on: bf16 matmuls
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b))
    assert float(cos.min()) > 0.99
    assert bf16.settings()["autocast"] == "bfloat16" and "autocast" not in fp32.settings()
    assert model.dtype == torch.float32  # weights untouched
