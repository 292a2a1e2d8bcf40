"""Evaluation: GraceEncoder, rationale cache, MTEB suites and local tasks, eval.py, compare."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from grace_lightning.eval.cache import CachedRationale, RationaleCache, rationale_key
from grace_lightning.eval.encoder import GraceEncoder, HubUnavailableError
from grace_lightning.eval.rundir import RunDirError
from grace_lightning.eval.suites import UnknownTaskError, build_tasks, suite_entries

from .conftest import DATA_ROOT, ROOT

CONF = ROOT / "conf"
# tiny random models on tiny subsets: sklearn warns about classes it never predicts
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
TEXTS = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "The cat sat on the mat.",
    "Stocks fell sharply on Monday after the report.",
    "A man is playing a guitar.",  # duplicate on purpose
    "How far is it from Denver to Aspen?",
]
needs_data = pytest.mark.skipif(
    not (DATA_ROOT / "sts12" / "test.jsonl").exists(), reason="../shared/data not available"
)


def suite(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "eval" / f"{name}.yaml"))


@pytest.fixture
def tiny_encoder(tiny_backbone, tmp_path):
    model, tok = tiny_backbone

    def make(**kwargs):
        kwargs.setdefault("mode", "rationale")
        kwargs.setdefault("generation", {"max_new_tokens": 6})
        kwargs.setdefault("max_prompt_tokens", 64)
        return GraceEncoder(model, tok, name="tiny", **kwargs)

    return make


# --------------------------------------------------------------------------- suites (metadata only)
PAPER_COUNTS = {
    "Retrieval": 15,
    "Reranking": 4,
    "Clustering": 11,
    "PairClassification": 3,
    "Classification": 12,
    "STS": 10,
    "Summarization": 1,
}


def test_paper_suite_is_56_tasks_with_the_papers_categories():
    tasks = build_tasks(suite("paper"))
    assert len(tasks) == 56
    assert Counter(t.metadata.type for t in tasks) == PAPER_COUNTS
    entries = suite_entries(suite("paper"))
    for entry, task in zip(entries, tasks):  # the yaml's category is mteb's own type
        assert task.metadata.type == entry["category"], entry["name"]
        assert not task.data_loaded  # metadata only: nothing downloaded
    names = {t.metadata.name for t in tasks}
    assert {"StackExchangeClusteringP2P", "TweetSentimentExtractionClassification"} <= names
    assert "TweetSentimentClassification" not in names
    by_name = {t.metadata.name: t for t in tasks}
    assert list(by_name["MSMARCO"].eval_splits) == ["dev"]
    assert by_name["STS17"].hf_subsets == ["en-en"]
    assert by_name["STS22"].hf_subsets == ["en"]
    assert by_name["AmazonCounterfactualClassification"].hf_subsets == ["en"]
    for name in (
        "MassiveIntentClassification",
        "MTOPDomainClassification",
        "AmazonReviewsClassification",
    ):
        assert by_name[name].hf_subsets == ["en"]


def test_paper_suite_equals_mtebs_classic_english_benchmark():
    import mteb

    ours = {
        t.metadata.name: (list(t.eval_splits), sorted(t.hf_subsets))
        for t in build_tasks(suite("paper"))
    }
    theirs = {
        t.metadata.name: (list(t.eval_splits), sorted(t.hf_subsets))
        for t in mteb.get_benchmark("MTEB(eng, v1)").tasks
    }
    assert ours == theirs


def test_upstream55_and_fast_suites():
    up = build_tasks(suite("upstream55"))
    assert len(up) == 55
    names = [t.metadata.name for t in up]
    assert "StackExchangeClusteringP2P" not in names and "TweetSentimentClassification" in names
    assert (
        len({t.metadata.name for t in up} - {e["name"] for e in suite_entries(suite("paper"))}) == 1
    )
    assert len(up[names.index("STS22")].hf_subsets) > 1  # upstream: no language filter
    fast = build_tasks(suite("fast"))
    assert {t.metadata.name for t in fast} <= {e["name"] for e in suite_entries(suite("paper"))}
    assert {t.metadata.type for t in fast} == set(PAPER_COUNTS)


def test_unknown_task_names_list_close_matches():
    bad = {"name": "x", "source": "mteb", "tasks": {"STS": ["STSBenchmrk"]}}
    with pytest.raises(UnknownTaskError, match="STSBenchmark"):
        build_tasks(bad)
    with pytest.raises(UnknownTaskError, match="LocalSTS12"):
        build_tasks(suite("local"), only=["LocalSTS21"], data_root=str(DATA_ROOT))
    with pytest.raises(ValueError, match="category"):
        build_tasks({"source": "mteb", "tasks": {"Retreival": ["SciFact"]}})


def test_hub_task_offline_names_the_local_suite(monkeypatch):
    import mteb

    from grace_lightning.eval.run import HubDataError, preflight

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = mteb.get_task("BIOSSES")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'mteb/biosses-sts' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(task, "load_data", offline)
    with pytest.raises(HubDataError, match=r"eval=local") as err:
        preflight([task])
    assert "BIOSSES" in str(err.value) and "mteb/biosses-sts" in str(err.value)


def test_hub_model_id_offline_is_a_clear_error(monkeypatch):
    from grace_lightning.eval.run import load_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match="model=smollm2"):
        load_encoder("some-org/not-a-cached-model")
    with pytest.raises(HubUnavailableError, match="Qwen/Qwen2.5-1.5B-Instruct"):
        load_encoder("qwen")  # conf/backbone/qwen.yaml: a Hub backbone
    with pytest.raises(RunDirError, match="no such run"):
        load_encoder("./no/such/run/dir")


# --------------------------------------------------------------------------- local tasks
@needs_data
def test_local_task_missing_file_is_a_clear_error(tmp_path):
    from grace_lightning.eval.local_tasks import LocalDataError

    with pytest.raises(LocalDataError, match=r"sts12/test.jsonl.*GRACE_DATA_ROOT"):
        build_tasks(suite("local"), only=["LocalSTS12"], data_root=str(tmp_path))


@needs_data
def test_local_tasks_load_and_subsample_deterministically():
    specs = suite("local")
    tasks = build_tasks(specs, data_root=str(DATA_ROOT), max_samples=10)
    assert {t.metadata.type for t in tasks} == {"STS", "Retrieval", "Classification", "Clustering"}
    for t in tasks:
        t.load_data()
    by = {t.metadata.name: t for t in tasks}
    sick = by["LocalSICKTrial"].dataset["test"]
    assert len(sick) == 10 and min(sick["score"]) >= 1 and max(sick["score"]) <= 5
    scifact = by["LocalSciFactTrain"].dataset["default"]["test"]
    assert len(scifact["queries"]) == 10 and set(scifact["relevant_docs"]) == set(
        scifact["queries"]["id"]
    )
    corpus_ids = set(scifact["corpus"]["id"])
    assert all(d in corpus_ids for rel in scifact["relevant_docs"].values() for d in rel)
    again = build_tasks(specs, data_root=str(DATA_ROOT), max_samples=10)
    again[-1].load_data()
    assert again[-1].dataset["test"]["sentence1"] == sick["sentence1"]
    # Banking77 has no test file here: a stratified split of train, disjoint and deterministic
    full = build_tasks(specs, only=["LocalBanking77Classification"], data_root=str(DATA_ROOT))[0]
    full.load_data()
    train, test = full.dataset["train"]["text"], full.dataset["test"]["text"]
    assert abs(len(test) / (len(train) + len(test)) - 0.3) < 0.01
    assert not set(test) & set(train) or len(set(test) & set(train)) < 20  # only duplicates


@needs_data
def test_local_suite_caps_by_type_and_corpus_per_query():
    from grace_lightning.eval.suites import SuiteError

    specs = {**suite("local"), "max_samples_by_type": {"Retrieval": 4}, "corpus_per_query": 1}
    tasks = build_tasks(
        specs, only=["LocalSciFactTrain", "LocalSTS12"], data_root=str(DATA_ROOT), max_samples=6
    )
    for t in tasks:
        t.load_data()
    by = {t.metadata.name: t for t in tasks}
    scifact = by["LocalSciFactTrain"].dataset["default"]["test"]
    relevant = {d for rel in scifact["relevant_docs"].values() for d in rel}
    assert len(scifact["queries"]) == 4  # the type cap, tighter than max_samples=6
    assert len(scifact["corpus"]) == len(relevant) + 4  # judged docs + 1 random doc per query
    assert len(by["LocalSTS12"].dataset["test"]) == 6  # other types keep max_samples
    with pytest.raises(SuiteError, match="Retreival"):
        build_tasks({**specs, "max_samples_by_type": {"Retreival": 4}}, data_root=str(DATA_ROOT))


# --------------------------------------------------------------------------- encoder
def test_encode_shapes_modes_and_options(tiny_encoder):
    enc = tiny_encoder()
    vecs, why = enc.encode(TEXTS, batch_size=4, return_rationales=True)
    assert vecs.shape == (len(TEXTS), 64) and vecs.dtype == np.float32
    assert all(isinstance(r, str) for r in why) and why[0] == why[4]
    np.testing.assert_array_equal(vecs[0], vecs[4])  # duplicates are generated once
    assert enc.stats["generated"] == len(set(TEXTS))
    one = enc.encode(TEXTS[0])
    assert one.shape == (64,) and np.allclose(one, vecs[0], atol=1e-5)
    t = enc.encode(TEXTS[:2], convert_to_tensor=True, normalize_embeddings=True)
    assert isinstance(t, torch.Tensor) and torch.allclose(t.norm(dim=-1), torch.ones(2))
    base, none = enc.encode(TEXTS, mode="base", return_rationales=True)
    assert base.shape == vecs.shape and none == [None] * len(TEXTS)
    assert not np.allclose(base, vecs)
    assert enc.similarity(vecs, vecs).diagonal().allclose(torch.ones(len(TEXTS)))
    assert enc.encode([]).shape == (0, 64)
    qd = tiny_encoder(prompts={"query": "Represent the question.", "document": None})
    q = qd.encode(TEXTS[:2], prompt_type="query", mode="base")
    d = qd.encode(TEXTS[:2], prompt_type="document", mode="base")
    assert not np.allclose(q, d)
    np.testing.assert_allclose(d, base[:2], atol=1e-5)


def test_sentence_transformers_style_prompts(tiny_encoder):
    """prompt_name / prompt / encode_query / encode_document pick SYSTEM prompts."""
    qd = tiny_encoder(
        mode="base", prompts={"query": "Represent the question.", "document": "Describe it."}
    )
    plain = qd.encode(TEXTS[:2])
    q, d = qd.encode_query(TEXTS[:2]), qd.encode_document(TEXTS[:2])
    np.testing.assert_allclose(q, qd.encode(TEXTS[:2], prompt_name="query"), atol=1e-6)
    np.testing.assert_allclose(q, qd.encode(TEXTS[:2], prompt="Represent the question."), atol=1e-6)
    np.testing.assert_allclose(d, qd.encode(TEXTS[:2], "document"), atol=1e-6)  # positional
    assert not np.allclose(q, d) and not np.allclose(q, plain)
    with pytest.warns(DeprecationWarning, match="prompt_name"):
        old = qd.encode(TEXTS[:2], prompt_type="query")
    np.testing.assert_allclose(old, q, atol=1e-6)
    with pytest.raises(ValueError, match="not in prompts"):
        qd.encode(TEXTS[:2], prompt_name="nope")
    # default_prompt_name applies when no prompt is given
    dq = tiny_encoder(mode="base", prompts=qd.prompts, default_prompt_name="query")
    np.testing.assert_allclose(dq.encode(TEXTS[:2]), q, atol=1e-6)
    with pytest.raises(ValueError, match="default_prompt_name"):
        tiny_encoder(prompts={}, default_prompt_name="query")
    # no prompts: query/document fall back to the system prompt (upstream: one prompt)
    same = tiny_encoder(mode="base")
    np.testing.assert_allclose(same.encode_query(TEXTS[:2]), same.encode(TEXTS[:2]), atol=1e-6)
    assert same.get_sentence_embedding_dimension() == 64
    np.testing.assert_allclose(same.encode(TEXTS[:2], device="cpu"), same.encode(TEXTS[:2]))


def test_public_api_is_lazy():
    import subprocess
    import sys

    code = (
        "import sys, grace_lightning as g; assert 'torch' not in sys.modules; "
        "from grace_lightning import GraceEncoder, grace_model_meta, export_run; "
        "assert GraceEncoder.__name__ == 'GraceEncoder'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_rationales_are_seeded_per_text_not_per_batch(tiny_encoder):
    enc = tiny_encoder()
    a, ra = enc.encode(TEXTS, batch_size=1, return_rationales=True)
    b, rb = enc.encode(TEXTS[::-1], batch_size=5, return_rationales=True)
    assert ra == rb[::-1]
    np.testing.assert_allclose(a, b[::-1], atol=1e-4)
    other = tiny_encoder(generation={"max_new_tokens": 6, "seed": 1})
    assert other.rationales(TEXTS) != ra
    greedy = tiny_encoder(generation={"max_new_tokens": 6, "temperature": 0})
    assert greedy.rationales(TEXTS[:2]) == greedy.rationales(TEXTS[:2][::-1])[::-1]


def test_base_mode_matches_encode_prompts(tiny_backbone, tiny_encoder):
    from grace_lightning.embedding import encode_prompts

    model, tok = tiny_backbone
    enc = tiny_encoder(mode="base")
    p = enc.prompter()
    ref = encode_prompts(model, p.encode(TEXTS), p.system_len, tok.pad_token_id, batch_size=2)
    np.testing.assert_allclose(enc.encode(TEXTS, batch_size=3), ref.numpy(), atol=1e-5)


# --------------------------------------------------------------------------- rationale cache
def test_cache_key_covers_model_prompt_text_and_settings():
    s = {"temperature": 1.0, "max_new_tokens": 8, "seed": 0}
    k = rationale_key("fp", "sys", "text", s)
    assert k == rationale_key("fp", "sys", "text", dict(reversed(list(s.items()))))
    assert (
        len(
            {
                k,
                rationale_key("fp2", "sys", "text", s),
                rationale_key("fp", "sys2", "text", s),
                rationale_key("fp", "sys", "text2", s),
                rationale_key("fp", "sys", "text", {**s, "seed": 1}),
                rationale_key("fp", "sys", "text", {**s, "temperature": 0.5}),
            }
        )
        == 6
    )


def test_second_encode_generates_nothing(tiny_encoder, tmp_path, monkeypatch):
    import grace_lightning.eval.encoder as encoder_module

    calls = []
    real = encoder_module.HFRolloutEngine.generate

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(encoder_module.HFRolloutEngine, "generate", counting)
    path = tmp_path / "r.sqlite"
    first = tiny_encoder(cache=path)
    v1, r1 = first.encode(TEXTS, batch_size=2, return_rationales=True)
    n_first = len(calls)
    assert n_first == 3 and first.cache.stats()["writes"] == len(set(TEXTS))
    first.cache.close()

    second = tiny_encoder(cache=path)  # a fresh encoder (new process in real life)
    v2, r2 = second.encode(TEXTS, batch_size=4, return_rationales=True)
    assert len(calls) == n_first  # nothing generated
    assert second.stats["generated"] == 0 and second.cache.stats()["hits"] == len(set(TEXTS))
    np.testing.assert_array_equal(v1, v2)
    assert r1 == r2
    changed = tiny_encoder(cache=path, generation={"max_new_tokens": 7})  # new settings: new keys
    changed.encode(TEXTS[:1])
    assert changed.stats["generated"] == 1


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from grace_lightning.eval.cache import CachedRationale, RationaleCache
    cache = RationaleCache(sys.argv[1])
    have = {k for k in cache.get_many([f"k{i}" for i in range(int(sys.argv[2]))])}
    batch, wrote = {}, 0
    for i in range(int(sys.argv[2])):
        key = f"k{i}"
        if key in have:
            continue
        emb = np.full(256, i, dtype=np.float32)
        batch[key] = (f"text {i}", CachedRationale(f"why {i} " * 50, list(range(i % 50)), True, emb))
        if len(batch) == 20:
            cache.put_many(batch)
            wrote += len(batch)
            print(wrote, flush=True)
            batch = {}
    if batch:
        cache.put_many(batch)
        wrote += len(batch)
    print("done", wrote, flush=True)
    """
)


def test_cache_survives_kill_9_and_resumes(tmp_path):
    path, n = tmp_path / "r.sqlite", 4000
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), str(n)], stdout=subprocess.PIPE, text=True, env=env
    )
    committed = 0
    for line in proc.stdout:  # let some transactions commit, then kill mid-stream
        committed = int(line.split()[-1])
        if committed >= 400:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with RationaleCache(path) as cache:
        assert cache.check() == "ok"
        stored = len(cache)
        assert committed <= stored < n and stored % 20 == 0  # whole transactions only
        found = cache.get_many([f"k{i}" for i in range(n)])
        assert len(found) == stored
        for key, entry in found.items():  # every committed row is complete and valid
            i = int(key[1:])
            assert entry.rationale == f"why {i} " * 50 and entry.response_ids == list(range(i % 50))
            assert entry.embedding.shape == (256,) and (entry.embedding == i).all()

    rerun = subprocess.run(
        [sys.executable, str(script), str(path), str(n)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert rerun.stdout.strip().splitlines()[-1] == f"done {n - stored}"  # resumes, no rework
    with RationaleCache(path) as cache:
        assert len(cache) == n and cache.check() == "ok"


_ENCODER_CHILD = textwrap.dedent(
    """
    import sys
    from grace_lightning.eval.encoder import GraceEncoder
    from grace_lightning.models.backbone import BackboneConfig
    enc = GraceEncoder.from_backbone(
        BackboneConfig(name="tiny", source="tiny"), device="cpu", mode="rationale",
        generation={"max_new_tokens": 24}, max_prompt_tokens=64, cache=sys.argv[1])
    texts = [f"sentence number {i} about topic {i % 7}" for i in range(int(sys.argv[2]))]
    enc.encode(texts, batch_size=2, show_progress_bar=False)
    """
)


def test_encoder_killed_mid_generation_resumes(tmp_path, tiny_encoder):
    path, n = tmp_path / "r.sqlite", 60
    script = tmp_path / "child.py"
    script.write_text(_ENCODER_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(n)], env=env)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if path.exists():
            with RationaleCache(path) as c:
                if len(c) >= 6:
                    break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with RationaleCache(path) as c:
        done = len(c)
        assert c.check() == "ok" and 6 <= done < n

    texts = [f"sentence number {i} about topic {i % 7}" for i in range(n)]
    enc = tiny_encoder(cache=path, generation={"max_new_tokens": 24})
    vecs = enc.encode(texts, batch_size=8)
    assert enc.stats["cached"] == done and enc.stats["generated"] == n - done  # resumed
    fresh = tiny_encoder(generation={"max_new_tokens": 24}).encode(texts, batch_size=8)
    np.testing.assert_allclose(vecs, fresh, atol=1e-4)  # what the killed run stored is sound


# --------------------------------------------------------------------------- run dirs
@pytest.fixture
def export_dir(tiny_backbone, tmp_path):
    model, tok = tiny_backbone
    run = tmp_path / "run"
    export = run / "export"
    model.save_pretrained(export)
    tok.save_pretrained(export)
    (export / "grace_config.json").write_text(
        json.dumps(
            {"system_prompt": "Summarise the text.", "max_prompt_tokens": 64, "backbone": "tiny"}
        )
    )
    return run


def test_from_run_dir_reads_the_export(export_dir, tiny_backbone):
    enc = GraceEncoder.from_run_dir(export_dir, device="cpu", mode="base")
    assert enc.system_prompt == "Summarise the text." and enc.max_prompt_tokens == 64
    model, tok = tiny_backbone
    ref = GraceEncoder(
        model, tok, mode="base", system_prompt="Summarise the text.", max_prompt_tokens=64
    )
    np.testing.assert_allclose(enc.encode(TEXTS), ref.encode(TEXTS), atol=1e-5)
    again = GraceEncoder.from_pretrained(export_dir / "export", device="cpu", mode="base")
    assert again.fingerprint == enc.fingerprint


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda e: (e / "model.safetensors").write_bytes(
                (e / "model.safetensors").read_bytes()[:5000]
            ),
            "model.safetensors: truncated",
        ),
        (lambda e: (e / "model.safetensors").unlink(), "no weights"),
        (lambda e: (e / "config.json").unlink(), "config.json is missing"),
        (lambda e: (e / "config.json").write_text('{"model_type": "lla'), "config.json: corrupt"),
        (lambda e: (e / "grace_config.json").write_text("{"), "grace_config.json: corrupt"),
        (
            lambda e: [(e / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
            "tokenizer files are missing",
        ),
    ],
)
def test_broken_run_dir_names_the_file(export_dir, damage, message):
    damage(export_dir / "export")
    with pytest.raises(RunDirError, match=message):
        GraceEncoder.from_run_dir(export_dir, device="cpu")


def test_run_dir_without_export(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunDirError, match="no export/.*python -m grace_lightning.export"):
        GraceEncoder.from_run_dir(tmp_path / "run")
    with pytest.raises(RunDirError, match="no such"):
        GraceEncoder.from_run_dir(tmp_path / "missing")


# --------------------------------------------------------------------------- eval.py end to end
def eval_cfg(tmp_path: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig().set_config(cfg)
    return cfg


FAST_LOCAL = [
    "model=tiny",
    "eval=local",
    "eval.max_samples=10",
    "eval.n_experiments=2",
    "eval.samples_per_label=2",
    "eval.n_clusters=2",
    "prompt.max_prompt_tokens=48",
    "generation.max_new_tokens=4",
    "batch_size=8",
    "progress_bar=false",
]


@needs_data
def test_eval_local_suite_end_to_end_base_then_rationale_then_cached(tmp_path, capsys):
    from grace_lightning.eval.compare import main as compare_main
    from grace_lightning.eval.run import evaluate

    cache = f"cache.path={tmp_path / 'rationales.sqlite'}"
    runs = {}
    for name, extra in [
        ("base", ["mode=base"]),
        ("rat", ["mode=rationale"]),
        ("rat2", ["mode=rationale"]),
    ]:
        out = tmp_path / name
        runs[name] = evaluate(eval_cfg(out, [*FAST_LOCAL, cache, *extra, f"label={name}"]))
        printed = capsys.readouterr().out
        assert (
            "| Model | Retr (1) | Rerank | Clust (2) | PairCl | Class (2) | STS (7) | Summ | **Avg** |"
            in printed
        )
        assert "Avg = unweighted mean over all 12 tasks" in printed
        for f in ("results.md", "results.csv", "tasks.csv", "scores.json"):
            assert (out / f).is_file()
        assert list((out / "mteb" / "results").rglob("LocalSTS12.json"))  # mteb's own files
    for run in runs.values():
        assert run["n_tasks"] == 12
        assert {t["category"] for t in run["tasks"]} == {"Retr", "Clust", "Class", "STS"}
        assert all(math.isfinite(t["score"]) for t in run["tasks"])
        split = {t["task"]: t["split"] for t in run["tasks"]}  # what the model card labels
        assert split["LocalSICKTrial"] == "trial" and split["LocalSTS12"] == "test"
        assert run["avg"] == pytest.approx(np.mean([t["score"] for t in run["tasks"]]))
    assert runs["base"]["encoder_stats"]["generate_calls"] == 0
    assert runs["rat"]["encoder_stats"]["generated"] > 0
    assert runs["rat2"]["encoder_stats"]["generate_calls"] == 0  # all from the cache
    assert [t["score"] for t in runs["rat2"]["tasks"]] == pytest.approx(
        [t["score"] for t in runs["rat"]["tasks"]]
    )
    assert not (Path.home() / ".cache" / "mteb" / "results" / "grace-lightning__tiny").exists()

    out = tmp_path / "cmp"
    compare_main(
        [str(tmp_path / n) for n in ("base", "rat")]
        + ["--out", str(out), "--labels", "Base", "w/ reasoning"]
    )
    md = out.with_suffix(".md").read_text()
    assert "| Base |" in md and "| w/ reasoning |" in md and "LocalSICKTrial" in md
    assert out.with_suffix(".png").stat().st_size > 5000


def test_wandb_table_when_enabled(tmp_path, monkeypatch):
    import types

    from grace_lightning.eval.run import log_wandb

    logged = {}

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class Run:
        summary: dict = {}

        def log(self, d):
            logged.update(d)

        def finish(self):
            logged["finished"] = True

    fake = types.SimpleNamespace(Table=Table, init=lambda **k: logged.update(init=k) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = {
        "label": "m",
        "model": "tiny",
        "mode": "base",
        "suite": "local",
        "fingerprint": "f",
        "generation": {},
        "tasks": [{"task": "T", "category": "STS", "main_score": "s", "score": 50.0}],
        "categories": {"STS": 50.0},
        "avg": 50.0,
        "n_tasks": 1,
    }
    log_wandb(run, {"project": "p", "mode": "offline"}, tmp_path)
    assert logged["init"]["mode"] == "offline"
    table = logged["eval/table"]
    assert table.columns[1:9] == [
        "Retr",
        "Rerank",
        "Clust",
        "PairCl",
        "Class",
        "STS",
        "Summ",
        "Avg",
    ]
    assert table.data[0][6] == 50.0 and logged["finished"]


def test_eval_config_defaults_follow_the_paper(tmp_path):
    cfg = eval_cfg(tmp_path, [])
    assert cfg.model == "smollm2" and cfg.mode == "rationale" and cfg.eval.name == "local"
    assert cfg.generation.temperature == 1.0 and cfg.generation.max_new_tokens == 2048
    assert cfg.generation.top_p == 1.0 and cfg.batch_size == 16
    assert (
        Path(cfg.eval.data_root).resolve() == DATA_ROOT.resolve() or "GRACE_DATA_ROOT" in os.environ
    )
    for name in ("paper", "upstream55", "fast"):
        assert eval_cfg(tmp_path, [f"eval={name}"]).eval.source == "mteb"


def test_cached_rationale_roundtrip(tmp_path):
    with RationaleCache(tmp_path / "c.sqlite") as c:
        c.put_many(
            {"a": ("t", CachedRationale("why", [1, 2], False, np.arange(3, dtype=np.float32)))}
        )
        got = c.get_many(["a", "b"])
        assert got["a"].response_ids == [1, 2] and not got["a"].finished
        assert c.stats() == {"hits": 1, "misses": 1, "writes": 1}
    (tmp_path / "bad.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(RuntimeError, match="not a readable SQLite"):
        RationaleCache(tmp_path / "bad.sqlite")


def test_prompt_config_maps_to_system_prompts():
    from grace_lightning.eval.run import _prompt_kwargs

    assert _prompt_kwargs({"query": None, "document": None, "by_task": {}}) == {}
    got = _prompt_kwargs(
        {"system_prompt": "S", "query": "Q", "document": None, "by_task": {"STS": "T"}}
    )
    assert got == {"system_prompt": "S", "prompts": {"query": "Q", "STS": "T"}}


@needs_data
def test_eval_num_processes_2_gives_the_scores_of_one_process(tmp_path):
    """``eval.py num_processes=2``: rationale generation sharded over 2 CPU processes, caches
    merged; per-text seeded sampling makes every score equal to the 1-process run."""
    from grace_lightning.eval.run import evaluate

    only = "tasks=[LocalSTS12,LocalSICKTrial]"
    runs = {}
    for n in (1, 2):
        cache = f"cache.path={tmp_path / f'rationales{n}.sqlite'}"
        out = tmp_path / f"p{n}"
        runs[n] = evaluate(
            eval_cfg(out, [*FAST_LOCAL, cache, only, "mode=rationale", f"num_processes={n}"])
        )
    assert runs[2]["encoder_stats"]["generated"] == runs[1]["encoder_stats"]["generated"] > 0
    assert [t["score"] for t in runs[2]["tasks"]] == pytest.approx(
        [t["score"] for t in runs[1]["tasks"]], abs=1e-6
    )
    # the workers' cache shards were merged into the main cache: every rationale is there
    from grace_lightning.eval.cache import RationaleCache

    def rows(path):
        cache = RationaleCache(path)
        try:
            return cache._db.execute("SELECT COUNT(*) FROM rationales").fetchone()[0]
        finally:
            cache.close()

    assert rows(tmp_path / "rationales2.sqlite") == rows(tmp_path / "rationales1.sqlite") > 0


def test_local_task_source_split_is_read_from_the_scored_file():
    from grace_lightning.eval.local_tasks import source_split

    assert source_split({"path": "sick/trial.jsonl"}) == "trial"
    assert source_split({"path": "stsb/dev.jsonl"}) == "dev"
    assert source_split({"qrels": "scifact/qrels/train.tsv", "queries": "q.jsonl"}) == "train"
    assert source_split({"train": "trec/train.jsonl", "test": "trec/test.jsonl"}) == "test"
    assert source_split({"train": "banking77/train.jsonl"}) == "train"  # held-out part of train
    assert source_split({"path": "x/sentences.jsonl"}) == "test"  # no split in the name
    assert source_split({"path": "sick/trial.jsonl", "source_split": "validation"}) == "validation"
