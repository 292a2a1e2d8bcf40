"""Any checkpoint -> an export (transformers + sentence-transformers + model card); bad input."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch

from grace_lightning import GraceEncoder
from grace_lightning.export import ExportError, export_run
from grace_lightning.export.__main__ import main as export_main

from .conftest import DATA_ROOT
from .test_train import TINY, make_cfg

TEXTS = ["A man is playing a guitar.", "Two dogs run across a snowy field."]


def write_ckpt(tmp_path: Path, overrides: list[str], noise: float = 0.05):
    """A run dir with checkpoints/last.ckpt of a module built from train.py's config.

    The weights are moved off the tiny model's seeded init, so an export that silently used a
    fresh backbone instead of the checkpoint's weights would fail the comparisons."""
    run = tmp_path / "run"
    cfg = make_cfg([*TINY, *overrides], run)
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(noise * torch.randn(p.shape, generator=g))
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
            "global_step": 4,
            "epoch": 0,
        },
        ckpt,
    )
    return run, ckpt, module


@pytest.fixture(scope="module")
def grace_ckpt(tmp_path_factory):
    return write_ckpt(tmp_path_factory.mktemp("grace"), ["reward=sup"])


def test_grace_checkpoint_exports_its_weights(grace_ckpt):
    run, ckpt, module = grace_ckpt
    out = export_run(ckpt)  # last.ckpt -> <run>/export
    assert out == run / "export"
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    for (n, p), (_, q) in zip(module.policy.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p.detach(), q), n
    meta = json.loads((out / "grace_config.json").read_text())
    assert meta["embedding_mode"] == "rationale" and meta["checkpoint"] == str(ckpt.resolve())
    assert meta["system_prompt"] == module.prompt_cfg["system_prompt"]
    assert meta["training"]["algo"]["advantage"] == module.algo_cfg["advantage"]
    assert meta["generation"]["max_new_tokens"] == module.rollout_cfg["max_new_tokens"]
    for f in ("modules.json", "config_sentence_transformers.json", "grace_embedding.py"):
        assert (out / f).is_file(), f
    assert (out / "README.md").read_text().startswith("---\n")

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    enc = GraceEncoder.from_pretrained(run, device="cpu")
    for mode in ("base", "rationale"):
        np.testing.assert_allclose(
            st.encode(TEXTS, mode=mode), enc.encode(TEXTS, mode=mode), atol=1e-5
        )


def test_other_checkpoint_names_and_out_dir(grace_ckpt, tmp_path):
    run, ckpt, _ = grace_ckpt
    step = ckpt.with_name("step_000004.ckpt")
    step.write_bytes(ckpt.read_bytes())
    try:
        assert export_run(step) == run / "export-step_000004"
        assert export_run(step, tmp_path / "elsewhere") == tmp_path / "elsewhere"
        assert (tmp_path / "elsewhere" / "model.safetensors").is_file()
    finally:
        step.unlink()


def test_lora_checkpoint_merged_by_default_or_adapter_only(tmp_path):
    run, ckpt, module = write_ckpt(tmp_path, ["reward=sup", "peft=lora"])
    merged = export_run(ckpt, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in m.named_parameters())
    q = m.model.layers[0].self_attn.q_proj.weight
    base_q = module.policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(q, base_q)  # LoRA delta merged in
    assert (merged / "adapter" / "adapter_config.json").is_file()

    assert export_main([str(ckpt), str(tmp_path / "adapter"), "--adapter-only"]) == 0
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()
    assert json.loads((adapter / "grace_config.json").read_text())["adapter_only"] is True
    assert "Adapter only" in (adapter / "README.md").read_text()
    # the tiny base is built from a config, so nothing could load this adapter: say so
    from grace_lightning.eval.rundir import RunDirError
    from grace_lightning.export.hub import push_to_hub

    for load in (lambda: GraceEncoder.from_run_dir(adapter), lambda: push_to_hub(adapter, "me/x")):
        with pytest.raises(RunDirError, match="no base_model_name_or_path; re-export merged"):
            load()


def test_contrastive_checkpoint_exports_base_mode(tmp_path):
    run, ckpt, module = write_ckpt(tmp_path, ["method=infonce"])
    out = export_run(run)  # a run dir without export/: its last checkpoint
    assert out == run / "export"
    meta = json.loads((out / "grace_config.json").read_text())
    assert meta["embedding_mode"] == "base" and meta["method"] == "infonce"
    enc = GraceEncoder.from_pretrained(run, device="cpu")
    assert enc.mode == "base"


# ----------------------------------------------------------------------------- bad input
def _half_written(tmp_path: Path) -> Path:
    from grace_lightning.models.backbone import BackboneConfig, load_backbone

    model, tok = load_backbone(BackboneConfig(name="tiny", source="tiny"))
    export = tmp_path / "run" / "export"
    model.save_pretrained(export)
    tok.save_pretrained(export)
    (export / "model.safetensors").unlink()
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return tmp_path / "run"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: t / "missing", "missing: no such run dir"),
        (lambda t: Path("some-org/grace-model"), "grace-model: no such .* looks like a Hub id"),
        (lambda t: t.joinpath("empty").mkdir() or t / "empty", "empty: neither an export"),
        (
            lambda t: _half_written(t),
            "export: no weights.*python -m grace_lightning.export .*last.ckpt",
        ),
        (
            lambda t: (
                torch.save(
                    {"state_dict": {}, "hyper_parameters": {"n_layers": 2}}, t / "other.ckpt"
                )
                or t / "other.ckpt"
            ),
            "other.ckpt: a checkpoint of another model class",
        ),
        (
            lambda t: (t / "cut.ckpt").write_bytes(b"PK\x03\x04 half") and t / "cut.ckpt",
            "cut.ckpt: not a readable PyTorch checkpoint",
        ),
        (
            lambda t: (t / "notes.txt").write_text("x") and t / "notes.txt",
            "notes.txt: not a .ckpt",
        ),
    ],
    ids=[
        "missing",
        "hub-id",
        "empty-dir",
        "half-written-export",
        "other-class",
        "cut-ckpt",
        "not-ckpt",
    ],
)
def test_bad_input_is_one_clear_line(make, message, tmp_path, capsys):
    path = make(tmp_path)
    capsys.readouterr()  # setup output (progress bars)
    assert export_main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    import re

    assert re.search(message, err), err
    with pytest.raises(ExportError):
        export_run(path)


def test_adapter_only_needs_a_lora_run(grace_ckpt, tmp_path, capsys):
    _, ckpt, _ = grace_ckpt
    assert export_main([str(ckpt), str(tmp_path / "a"), "--adapter-only"]) == 2
    assert "needs a LoRA run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- eval.py model=.ckpt
@pytest.mark.skipif(not (DATA_ROOT / "sts12").exists(), reason="../shared/data not available")
def test_eval_takes_a_checkpoint(grace_ckpt, tmp_path, monkeypatch):
    from grace_lightning.eval import run as run_mod
    from grace_lightning.eval.run import evaluate

    from .test_eval import FAST_LOCAL, eval_cfg

    monkeypatch.setenv("GRACE_CACHE", str(tmp_path / "cache"))
    _, ckpt, _ = grace_ckpt
    args = [*FAST_LOCAL, f"model={ckpt}", "mode=base", "tasks=[LocalSTS12]", "cache.enabled=false"]
    args.remove("model=tiny")
    res = evaluate(eval_cfg(tmp_path / "e1", args))
    assert res["n_tasks"] == 1 and np.isfinite(res["avg"])
    exports = list((tmp_path / "cache" / "exports").iterdir())
    assert len(exports) == 1 and exports[0].name.startswith("run-last-")
    assert (exports[0] / "modules.json").is_file()

    def no_second_export(*a, **k):
        raise AssertionError("the checkpoint was exported again")

    monkeypatch.setattr("grace_lightning.export.export_checkpoint", no_second_export)
    enc = run_mod.load_encoder(str(ckpt), device="cpu", mode="base")  # reuses the cached export
    assert enc.name == "run-last" and enc.source_dir == exports[0]


# ----------------------------------------------------------------------------- model card, Hub
def _run_with_history(tiny_backbone, tmp_path: Path) -> Path:
    from grace_lightning.export import save_policy

    model, tok = tiny_backbone
    run = tmp_path / "run"
    meta = {
        "system_prompt": "Summarise the text.",
        "max_prompt_tokens": 48,
        "backbone": "tiny",
        "rollout": {"temperature": 1.0, "max_new_tokens": 5},
        "global_step": 8,
    }
    save_policy(model, tok, run / "export", meta, False)
    rows = [
        {"step": s, "text": t, "rationale": f"<think>about {t} at {s}</think>", "reward": 0.25}
        for s in (4, 8)
        for t in ("First text.", "Second text.")
    ]
    (run / "rationales.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{cut")
    (run / "eval").mkdir()
    scores = {
        "label": "tiny",
        "mode": "rationale",
        "suite": "local",
        "avg": 41.5,
        "tasks": [
            {"task": "STS12", "category": "STS", "main_score": "cosine_spearman", "score": 50.0},
            {
                "task": "LocalSciFactTrain",
                "category": "Retr",
                "main_score": "ndcg_at_10",
                "split": "train",  # local tasks evaluate the split they have (dev, trial, train)
                "score": 33.0,
            },
        ],
    }
    (run / "eval" / "scores.json").write_text(json.dumps(scores))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("algo:\n  advantage: grpo\nreward:\n  tau: 0.05\n")
    return run


def test_model_card_is_written_and_parses(tiny_backbone, tmp_path):
    from huggingface_hub import ModelCard

    run = _run_with_history(tiny_backbone, tmp_path)
    out = export_run(run)  # refresh: the card now sees eval/scores.json and rationales.jsonl
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "sentence-transformers"
    assert data.pipeline_tag == "sentence-similarity"
    assert {"sentence-transformers", "mteb", "grace"} <= set(data.tags)
    assert data.license == "other" and data.base_model is None  # tiny: config-built, no Hub base
    results = {(r.task_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {
        ("STS12", "cosine_spearman"): 50.0,
        ("LocalSciFactTrain", "ndcg_at_10"): 33.0,
    }
    sts = next(r for r in data.eval_results if r.task_name == "STS12")
    assert sts.dataset_type == "mteb/sts12-sts" and sts.dataset_revision  # mteb's own dataset
    assert sts.dataset_split == "test"  # scores.json without a split: mteb's test split
    scifact = next(r for r in data.eval_results if r.task_name == "LocalSciFactTrain")
    assert scifact.dataset_split == "train"  # not labelled a test split it is not
    text = card.text
    assert "| STS12 | STS | cosine_spearman | 50.00 |" in text and "**41.50**" in text
    assert "<think>about First text. at 8</think>" in text and "at 4</think>" not in text
    assert "advantage: grpo" in text  # .hydra/config.yaml
    assert '"Summarise the text."' in text
    for snippet in (
        "from grace_lightning import GraceEncoder",
        "SentenceTransformer(",
        "trust_remote_code=True",
        "AutoModelForCausalLM.from_pretrained",
        "grace_model_meta(",
    ):
        assert snippet in text, snippet


def test_model_card_base_model_and_licence(tmp_path):
    from huggingface_hub import ModelCard

    from grace_lightning.export.card import write_model_card

    (tmp_path / "grace_config.json").write_text(
        json.dumps({"base_model": "Qwen/Qwen2.5-1.5B-Instruct", "system_prompt": None})
    )
    data = ModelCard.load(write_model_card(tmp_path)).data
    assert data.base_model == "Qwen/Qwen2.5-1.5B-Instruct" and data.license == "apache-2.0"
    assert not data.eval_results  # no eval in this run: no model-index
    assert "No evaluation in this run" in ModelCard.load(tmp_path / "README.md").text


def test_push_to_hub_uploads_the_export(tiny_backbone, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    from grace_lightning.export.hub import push_to_hub

    run = _run_with_history(tiny_backbone, tmp_path)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set.*not uploaded"):
        push_to_hub(run / "export", "me/grace-tiny")  # conftest sets HF_HUB_OFFLINE=1
    calls = {}
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: calls.update(repo=repo_id))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.update(
            upload=(repo_id, folder_path, sorted(p.name for p in Path(folder_path).iterdir()))
        )
        return "https://huggingface.co/me/grace-tiny/commit/abc"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert export_main([str(run), "--push-to-hub", "me/grace-tiny"]) == 0
    repo, folder, files = calls["upload"]
    assert calls["repo"] == repo == "me/grace-tiny" and Path(folder) == run / "export"
    assert {"README.md", "modules.json", "grace_embedding.py", "model.safetensors"} <= set(files)
    card = ModelCard.load(run / "export" / "README.md")
    assert 'SentenceTransformer("me/grace-tiny", trust_remote_code=True)' in card.text
    assert card.data.model_name == "me/grace-tiny"
    # the training knob: callbacks.export.push_to_hub=<repo id> uploads when fit ends
    from types import SimpleNamespace

    from grace_lightning.callbacks.export import ExportPolicy

    calls.clear()
    cb = ExportPolicy(str(run / "export"), push_to_hub="me/from-training")
    cb.on_fit_end(SimpleNamespace(is_global_zero=True, fast_dev_run=False), None)
    assert calls["upload"][0] == "me/from-training"
    calls.clear()
    ExportPolicy(str(run / "export")).on_fit_end(
        SimpleNamespace(is_global_zero=True, fast_dev_run=False), None
    )
    assert not calls  # off by default


@pytest.mark.parametrize(
    ("grace", "hydra_cfg", "title"),
    [
        (
            {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "reward": "sup"},
            None,
            "GRACE (supervised) on SmolLM2-135M-Instruct",
        ),
        (  # no reward in grace_config.json (older exports): the run's Hydra config says
            {"base_model": "Qwen/Qwen2.5-1.5B-Instruct", "backbone": "qwen"},
            "reward:\n  mode: unsup\n",
            "GRACE (unsupervised) on Qwen2.5-1.5B-Instruct",
        ),
        (
            {"method": "infonce", "backbone": "tiny"},
            None,
            "InfoNCE baseline (supervised) on tiny",
        ),
    ],
)
def test_model_card_is_titled_for_what_the_model_is(tmp_path, grace, hydra_cfg, title):
    """Not the run dir's date (``# 2026-12-06_02-10-36``): method, reward and base model."""
    from huggingface_hub import ModelCard

    from grace_lightning.export.card import write_model_card

    run = tmp_path / "2026-12-06_02-10-36"
    (run / "export").mkdir(parents=True)
    (run / "export" / "grace_config.json").write_text(json.dumps(grace))
    if hydra_cfg:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(hydra_cfg)
    card = ModelCard.load(write_model_card(run / "export", run_dir=run))
    first_heading = next(line for line in card.text.splitlines() if line.startswith("# "))
    assert first_heading == f"# {title}"
    assert card.data.model_name == title
    assert "run `2026-12-06_02-10-36`" in card.text  # the run is still named, below the title


def test_dev_scores_reach_the_model_index(tiny_backbone, tmp_path):
    """ExportPolicy, when fit ends, copies DevEvaluation's last scores into grace_config.json and
    the card: a model-index entry per dev task (dataset, split, cosine_spearman) + a table."""
    from types import SimpleNamespace

    from huggingface_hub import ModelCard

    from grace_lightning.callbacks.dev_eval import DevEvaluation
    from grace_lightning.callbacks.export import ExportPolicy
    from grace_lightning.export import export_options, save_policy

    model, tok = tiny_backbone
    run = tmp_path / "run"
    policy = SimpleNamespace(hparams={"reward": {"mode": "sup"}}, embedding_mode="rationale")
    from grace_lightning.callbacks.export import run_labels

    with export_options(extra_meta=run_labels(policy)):  # what ExportPolicy.on_train_end passes
        save_policy(model, tok, run / "export", {"backbone": "tiny"}, False)
    dev = DevEvaluation(data_root=str(DATA_ROOT), max_samples=8)
    dev.setup(None, None, "fit")  # reads the 8-pair subsets
    dev.start_scores = {"val/stsb_dev": 10.0, "val/sick_trial": 20.0, "val/dev_avg": 15.0}
    dev.history = [
        {"rollout_batch": 0.0, **dev.start_scores},
        {
            "rollout_batch": 12.0,
            "val/stsb_dev": 61.5,
            "val/sick_trial": 55.25,
            "val/dev_avg": 58.375,
        },
    ]
    trainer = SimpleNamespace(
        callbacks=[dev], is_global_zero=True, fast_dev_run=False, lightning_module=policy
    )
    ExportPolicy(str(run / "export")).on_fit_end(trainer, policy)

    grace = json.loads((run / "export" / "grace_config.json").read_text())
    assert grace["reward"] == "sup"
    assert grace["dev"]["rollout_batch"] == 12 and grace["dev"]["dev_avg"] == 58.375
    assert [t["pairs"] for t in grace["dev"]["tasks"]] == [8, 8]
    card = ModelCard.load(run / "export" / "README.md")
    assert "\n# GRACE (supervised) on tiny\n" in f"\n{card.text}"
    got = {r.task_name: r for r in card.data.eval_results}
    assert {k: r.metric_value for k, r in got.items()} == {"stsb_dev": 61.5, "sick_trial": 55.25}
    assert got["stsb_dev"].dataset_type == "mteb/stsbenchmark-sts"
    assert got["stsb_dev"].dataset_split == "dev" and got["sick_trial"].dataset_split == "trial"
    assert {r.metric_type for r in got.values()} == {"cosine_spearman"}
    assert "## Dev scores" in card.text and "| trained | 61.50 | 55.25 | 58.38 |" in card.text
    assert "| base model (untrained) | 10.00 | 20.00 | 15.00 |" in card.text
    # a refresh (python -m grace_lightning.export <run>) keeps them: they live in grace_config
    export_run(run)
    assert {
        r.task_name for r in ModelCard.load(run / "export" / "README.md").data.eval_results
    } >= {
        "stsb_dev",
        "sick_trial",
    }
