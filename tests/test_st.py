"""An export is a sentence-transformers model that embeds exactly like GraceEncoder."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from grace_lightning import GraceEncoder
from grace_lightning.export import ST_MODULE_FILE, save_policy

TEXTS = [
    "A man is playing a guitar.",
    "Two dogs run across a snowy field.",
    "The committee postponed its decision until the next quarterly meeting.",
    "Tea.",
    "A man is playing a guitar.",  # a duplicate: same vector, same rationale
]
META = {
    "system_prompt": "Summarise the text.",
    "max_prompt_tokens": 48,
    "backbone": "tiny",
    "rollout": {"temperature": 1.0, "max_new_tokens": 5},
}
ATOL = 1e-5  # fp32, different batch compositions (padding) on both sides


def make_export(tiny_backbone, root: Path, **meta) -> Path:
    model, tok = tiny_backbone
    return save_policy(model, tok, root / "run" / "export", {**META, **meta}, False)


@pytest.fixture(scope="module")
def export(tiny_backbone, tmp_path_factory) -> Path:
    return make_export(tiny_backbone, tmp_path_factory.mktemp("st"))


@pytest.fixture(scope="module")
def st_model(export):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(export), trust_remote_code=True, device="cpu")


@pytest.mark.parametrize("mode", ["base", "rationale"])
def test_sentence_transformers_gives_grace_encoder_vectors(export, st_model, mode):
    enc = GraceEncoder.from_run_dir(export.parent, device="cpu")
    assert enc.generation.max_new_tokens == 5  # the export's own settings, on both sides
    ref, why = enc.encode(TEXTS, mode=mode, batch_size=2, return_rationales=True)
    vecs = st_model.encode(TEXTS, mode=mode, batch_size=3)
    assert vecs.shape == ref.shape == (len(TEXTS), 64) and vecs.dtype == np.float32
    np.testing.assert_allclose(vecs, ref, atol=ATOL)
    got = st_model.encode(TEXTS, mode=mode, output_value="rationale", batch_size=4)
    assert got == why  # same rationales, in input order (None in base mode)
    if mode == "rationale":
        assert all(isinstance(r, str) and r for r in got) and got[0] == got[4]
        base = st_model.encode(TEXTS, mode="base")
        assert np.abs(base - vecs).max() > 1e-3  # the rationale changes the vector
    one = st_model.encode(TEXTS[1], mode=mode)
    np.testing.assert_allclose(one, ref[1], atol=ATOL)


def test_default_mode_and_model_kwargs(export, st_model):
    from sentence_transformers import SentenceTransformer

    assert st_model[0].mode == "rationale"  # grace_config.json embedding_mode
    enc = GraceEncoder.from_run_dir(export.parent, device="cpu")
    np.testing.assert_allclose(st_model.encode(TEXTS[:2]), enc.encode(TEXTS[:2]), atol=ATOL)
    base = SentenceTransformer(
        str(export), trust_remote_code=True, device="cpu", model_kwargs={"mode": "base"}
    )
    np.testing.assert_allclose(
        base.encode(TEXTS[:2]), enc.encode(TEXTS[:2], mode="base"), atol=ATOL
    )
    assert base.get_embedding_dimension() == 64
    assert base.similarity_fn_name == "cosine"


def test_prompts_are_system_prompts(tiny_backbone, tmp_path):
    from sentence_transformers import SentenceTransformer

    prompts = {"query": "Find what the question asks.", "document": "Describe the passage."}
    export = make_export(tiny_backbone, tmp_path, prompts=prompts)
    st = SentenceTransformer(str(export), trust_remote_code=True, device="cpu")
    assert st.prompts["query"] == prompts["query"] and st.default_prompt_name is None
    enc = GraceEncoder.from_run_dir(export.parent, device="cpu", mode="base")
    assert enc.prompts == prompts
    q, d, plain = (
        st.encode_query(TEXTS[:3], mode="base"),
        st.encode_document(TEXTS[:3], mode="base"),
        st.encode(TEXTS[:3], mode="base"),
    )
    np.testing.assert_allclose(q, enc.encode_query(TEXTS[:3]), atol=ATOL)
    np.testing.assert_allclose(d, enc.encode_document(TEXTS[:3]), atol=ATOL)
    np.testing.assert_allclose(plain, enc.encode(TEXTS[:3]), atol=ATOL)
    np.testing.assert_allclose(
        q, enc.encode(TEXTS[:3], prompt="Find what the question asks."), atol=ATOL
    )
    assert np.abs(q - d).max() > 1e-3 and np.abs(q - plain).max() > 1e-3
    own = st.encode(TEXTS[:3], prompt="Any system prompt.", mode="base")
    np.testing.assert_allclose(own, enc.encode(TEXTS[:3], prompt="Any system prompt."), atol=ATOL)


def test_without_trust_remote_code_it_refuses_instead_of_wrong_vectors(export):
    from sentence_transformers import SentenceTransformer

    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(export), device="cpu")


def test_module_file_is_self_contained(tiny_backbone, tmp_path, monkeypatch):
    """Hub users without grace_lightning get the same vectors: the file imports none of it."""
    src = (Path(__file__).parents[1] / "grace_lightning" / "export" / ST_MODULE_FILE).read_text()
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {
        "__future__",
        "contextlib",
        "hashlib",
        "inspect",
        "json",
        "os",
        "typing",
        "torch",
        "transformers",
        "sentence_transformers",
    }, imported

    from sentence_transformers import SentenceTransformer

    export = make_export(tiny_backbone, tmp_path / "fresh_name_for_a_fresh_import")
    ref = GraceEncoder.from_run_dir(export, device="cpu").encode(TEXTS[:2])
    monkeypatch.setitem(sys.modules, "grace_lightning", None)  # any import of it fails
    st = SentenceTransformer(str(export), trust_remote_code=True, device="cpu")
    assert "grace_lightning" not in type(st[0]).__module__
    np.testing.assert_allclose(st.encode(TEXTS[:2]), ref, atol=ATOL)


def test_plain_transformers_load_keeps_working(export, tiny_backbone):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    for (n, p), (_, q) in zip(tiny_backbone[0].named_parameters(), model.named_parameters()):
        assert torch.equal(p.detach(), q), n
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 2
    files = json.loads((export / "modules.json").read_text())
    assert files[0]["type"] == "grace_embedding.GraceEmbedding" and files[0]["path"] == ""


def test_st_save_roundtrip(st_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    st_model.save(str(tmp_path / "again"))
    again = SentenceTransformer(str(tmp_path / "again"), trust_remote_code=True, device="cpu")
    np.testing.assert_allclose(
        again.encode(TEXTS[:2], mode="base"), st_model.encode(TEXTS[:2], mode="base"), atol=ATOL
    )
    assert (tmp_path / "again" / ST_MODULE_FILE).is_file()


def _tokens_run(st, fn):
    """(result of fn(), tokens the decoder ran): counted at the embedding layer."""
    seen = []
    emb = st[0].model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        return fn(), sum(seen)
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["base", "rationale"])
def test_shared_prefix_runs_the_system_prompt_once_with_the_same_vectors(export, st_model, mode):
    """The system prompt + chat header run once per batch (not once per text), vectors unchanged:
    the same as without sharing and as GraceEncoder (which shares it too)."""
    module = st_model[0]
    assert module.share_prefix  # the default
    shared, n_shared = _tokens_run(
        st_model, lambda: st_model.encode(TEXTS, mode=mode, batch_size=len(TEXTS))
    )
    module.share_prefix = False
    try:
        plain, n_plain = _tokens_run(
            st_model, lambda: st_model.encode(TEXTS, mode=mode, batch_size=len(TEXTS))
        )
    finally:
        module.share_prefix = True
    head, _ = module._frame(module.system_prompt)
    # the prefix (= the system-prompt part, len(head) tokens) runs once instead of once per text
    assert n_plain - n_shared == (len(TEXTS) - 1) * len(head) > 0
    np.testing.assert_allclose(shared, plain, atol=ATOL)
    ref = GraceEncoder.from_run_dir(export.parent, device="cpu").encode(
        TEXTS, mode=mode, batch_size=2
    )
    np.testing.assert_allclose(shared, ref, atol=ATOL)


def test_bf16_precision_option(export, st_model):
    """precision="bf16" (model_kwargs, grace_config.json, attribute): bf16 autocast matmuls, fp32
    vectors close to the fp32 ones; an unknown precision is refused naming the choices."""
    from sentence_transformers import SentenceTransformer

    assert st_model[0].precision == "fp32"
    fp32 = st_model.encode(TEXTS, mode="base")
    bf16 = SentenceTransformer(
        str(export), trust_remote_code=True, device="cpu", model_kwargs={"precision": "bf16"}
    )
    assert bf16[0].precision == "bf16"
    low, kinds = bf16.encode(TEXTS, mode="base"), []
    q_proj = bf16[0].model.get_decoder().layers[0].self_attn.q_proj
    handle = q_proj.register_forward_hook(lambda m, a, out: kinds.append(out.dtype))
    try:
        bf16.encode(TEXTS[:1], mode="base")
        bf16.encode(TEXTS[:1], mode="rationale")
    finally:
        handle.remove()
    assert set(kinds) == {torch.bfloat16}  # the matmuls ran in bf16
    assert low.dtype == np.float32
    assert np.abs(low - fp32).max() > 0  # not the fp32 path
    cos = (low * fp32).sum(-1) / np.linalg.norm(low, axis=-1) / np.linalg.norm(fp32, axis=-1)
    assert cos.min() > 0.999, cos
    np.testing.assert_allclose(low, fp32, atol=0.05 * np.abs(fp32).max())
    st_model[0].precision = "bf16"  # the same switch, as an attribute
    try:
        np.testing.assert_allclose(st_model.encode(TEXTS, mode="base"), low, atol=1e-6)
    finally:
        st_model[0].precision = "fp32"
    rationale = bf16.encode(TEXTS, mode="rationale")
    assert rationale.shape == fp32.shape and np.isfinite(rationale).all()
    with pytest.raises(ValueError, match="precision='fp16': use one of"):
        SentenceTransformer(
            str(export), trust_remote_code=True, device="cpu", model_kwargs={"precision": "fp16"}
        )


def test_precision_and_prefix_survive_save(st_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    st_model[0].precision, st_model[0].share_prefix = "bf16", False
    try:
        st_model.save(str(tmp_path / "again"))
    finally:
        st_model[0].precision, st_model[0].share_prefix = "fp32", True
    cfg = json.loads((tmp_path / "again" / "grace_config.json").read_text())
    assert cfg["precision"] == "bf16" and cfg["share_prefix"] is False
    again = SentenceTransformer(str(tmp_path / "again"), trust_remote_code=True, device="cpu")
    assert again[0].precision == "bf16" and again[0].share_prefix is False
