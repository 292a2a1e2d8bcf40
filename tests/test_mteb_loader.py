"""MTEB builds a GRACE model from a path (ModelMeta.loader) and uses per-task system prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from grace_lightning.eval.encoder import GraceEncoder, HubUnavailableError
from grace_lightning.eval.mteb_model import GraceMTEBModel, grace_model_meta
from grace_lightning.export import save_policy

from .conftest import DATA_ROOT, ROOT

needs_data = pytest.mark.skipif(
    not (DATA_ROOT / "scifact" / "corpus.jsonl").exists(), reason="../shared/data not available"
)
SYSTEM = "Summarise the text."
QUERY_SP = "Say what the question asks for."
DOC_SP = "Say what the passage is about."


@pytest.fixture(scope="module")
def run_dir(tiny_backbone, tmp_path_factory) -> Path:
    model, tok = tiny_backbone
    run = tmp_path_factory.mktemp("mteb") / "run"
    meta = {"system_prompt": SYSTEM, "max_prompt_tokens": 48, "backbone": "tiny"}
    save_policy(model, tok, run / "export", meta, False, model_card=False)
    return run


def local_tasks(only: list[str], max_samples: int):
    from grace_lightning.eval.suites import build_tasks

    suite = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "eval" / "local.yaml"))
    suite["data_root"] = str(DATA_ROOT)
    suite["corpus_per_query"] = 3
    return build_tasks(suite, only=only, data_root=str(DATA_ROOT), max_samples=max_samples)


def test_prompt_keys_follow_mtebs_order(tiny_backbone):
    import mteb

    model, tok = tiny_backbone
    enc = GraceEncoder(model, tok, mode="base", system_prompt=SYSTEM, max_prompt_tokens=48)
    sts = mteb.get_task("STS12").metadata
    scifact = mteb.get_task("SciFact").metadata
    from mteb.types import PromptType

    prompts = {
        "query": "Q",
        "document": "D",
        "Retrieval-query": "RQ",
        "SciFact-query": "SQ",
        "STS": "S",
    }
    m = GraceMTEBModel(enc, model_prompts=prompts)
    assert m.get_prompt_name(scifact, PromptType.query) == "SciFact-query"
    assert m.get_prompt_name(scifact, PromptType.document) == "document"
    assert m.get_prompt_name(sts, None) == "STS"
    m2 = GraceMTEBModel(enc, model_prompts={"Retrieval-query": "RQ", "query": "Q"})
    assert m2.get_prompt_name(scifact, PromptType.query) == "Retrieval-query"
    assert GraceMTEBModel(enc).model_prompts is None  # no prompts: the system prompt everywhere


def test_model_meta_loader_builds_the_model(run_dir):
    meta = grace_model_meta(run_dir, mode="base", max_new_tokens=7)
    assert meta.name == "grace-lightning/run" and meta.loader is not None
    assert meta.embed_dim == 64 and meta.similarity_fn_name.value == "cosine"
    model = meta.load_model(device="cpu")
    assert isinstance(model, GraceMTEBModel) and model.mteb_model_meta.name == meta.name
    enc = model.model
    assert enc.mode == "base" and enc.system_prompt == SYSTEM
    assert enc.generation.max_new_tokens == 7
    ref = GraceEncoder.from_run_dir(run_dir, device="cpu", mode="base")
    np.testing.assert_allclose(enc.encode(["a b c"]), ref.encode(["a b c"]), atol=1e-6)


def test_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    meta = grace_model_meta("some-org/grace-model")
    with pytest.raises(HubUnavailableError, match="some-org/grace-model.*cannot be reached"):
        meta.load_model()


@needs_data
def test_mteb_runs_local_tasks_through_the_loader_with_query_and_document_prompts(
    run_dir, tmp_path
):
    import mteb

    tasks = local_tasks(["LocalSciFactTrain", "LocalSTS12"], max_samples=6)
    meta = grace_model_meta(
        run_dir, mode="base", model_prompts={"query": QUERY_SP, "document": DOC_SP}
    )
    cache = mteb.ResultCache(cache_path=tmp_path / "mteb")
    # 1. mteb.evaluate takes the ModelMeta itself and calls its loader
    result = mteb.evaluate(meta, tasks[1], cache=cache, co2_tracker=False, show_progress_bar=False)
    assert not result.exceptions and np.isfinite(result.task_results[0].get_score())
    # 2. the loaded model on a retrieval task: queries and documents get their own system prompt
    model = meta.load_model(device="cpu")
    result = mteb.evaluate(model, tasks[0], cache=cache, co2_tracker=False, show_progress_bar=False)
    assert not result.exceptions and np.isfinite(result.task_results[0].get_score())
    used = {(e["prompt_type"], e["system_prompt"]) for e in model.prompt_log}
    assert used == {("query", QUERY_SP), ("document", DOC_SP)}, model.prompt_log
    assert all(e["task"] == "LocalSciFactTrain" for e in model.prompt_log)
    # STS (no prompt_type): neither query nor document key applies -> the export's own prompt
    model.prompt_log.clear()
    mteb.evaluate(
        model,
        tasks[1],
        cache=cache,
        co2_tracker=False,
        overwrite_strategy="always",
        show_progress_bar=False,
    )
    assert {e["system_prompt"] for e in model.prompt_log} == {SYSTEM}


@needs_data
def test_mteb_scores_match_through_sentence_transformers(run_dir):
    """mteb's own SentenceTransformer wrapper on the export == the GRACE loader."""
    import mteb
    from sentence_transformers import SentenceTransformer

    (task,) = local_tasks(["LocalSTS12"], max_samples=8)
    st = SentenceTransformer(
        str(run_dir / "export"),
        trust_remote_code=True,
        device="cpu",
        model_kwargs={"mode": "base"},
    )
    kw = dict(cache=None, co2_tracker=False, show_progress_bar=False)
    via_st = mteb.evaluate(st, task, **kw).task_results[0].get_score()
    via_meta = mteb.evaluate(grace_model_meta(run_dir, mode="base"), task, **kw)
    assert via_st == pytest.approx(via_meta.task_results[0].get_score(), abs=1e-6)
