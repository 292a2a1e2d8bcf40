"""Data: readers (bad input -> file/line/field messages), offline default, sampler, datamodule."""

from __future__ import annotations

import json
import logging
import os
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from grace_lightning.data import offline
from grace_lightning.data.datamodule import GraceDataModule
from grace_lightning.data.readers import (
    DataError,
    DataFileNotFoundError,
    Triplet,
    load_hub_sentences,
    load_hub_triplets,
    read_sentences,
    read_triplets,
)
from grace_lightning.data.sampler import ResumableDataLoader, ResumableSampler

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GRACE_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _arrow_stores_in_tmp(tmp_path, monkeypatch):
    """Datamodules built here keep their Arrow stores in the test's tmp dir, not in the user's
    $GRACE_CACHE (the offline default data itself still comes from there)."""
    import grace_lightning.data.datamodule as dm_mod

    monkeypatch.setattr(dm_mod, "data_cache_dir", lambda: tmp_path / "grace_cache" / "data")


def write_lines(path: Path, lines: list[str | bytes | dict]) -> Path:
    with path.open("wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")
    return path


def triplet(i: int, **overrides) -> dict:
    return {"query": f"q{i}", "positive": f"p{i}", "negative": f"n{i}", **overrides}


# --------------------------------------------------------------------------- readers


def test_read_triplets_ok_strips_and_ignores_blank_lines(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [triplet(0, query="  q0 "), "", triplet(1)])
    rows, report = read_triplets(path)
    assert rows == [Triplet("q0", "p0", ["n0"]), Triplet("q1", "p1", ["n1"])]
    assert (report.kept, report.blank, report.num_skipped) == (2, 1, 0)


@pytest.mark.parametrize(
    "bad, expected",
    [
        ('{"query": "q", "positive": ', "t.jsonl:2: invalid JSON"),
        ("[1, 2]", "t.jsonl:2: expected a JSON object, got list"),
        ({"query": "q", "negative": "n"}, "t.jsonl:2: field 'positive': missing"),
        (
            {"query": 3, "positive": "p", "negative": "n"},
            "t.jsonl:2: field 'query': expected a string, got int",
        ),
        (
            {"query": "q", "positive": None, "negative": "n"},
            "field 'positive': expected a string, got null",
        ),
        (
            {"query": "q", "positive": " \t ", "negative": "n"},
            "t.jsonl:2: field 'positive': empty text",
        ),
        ({"query": "q", "positive": "p"}, "t.jsonl:2: field 'negative': missing"),
        (
            {"query": "q", "positive": "p", "negative": ["a", 5]},
            "t.jsonl:2: field 'negative[1]': expected a string",
        ),
        (
            {"query": "q", "positive": "p", "negative": []},
            "t.jsonl:2: field 'negative': empty list",
        ),
        (b'{"query": "caf\xe9", "positive": "p", "negative": "n"}', "t.jsonl:2: not valid UTF-8"),
    ],
)
def test_read_triplets_bad_line_names_file_line_field(tmp_path, bad, expected):
    path = write_lines(tmp_path / "t.jsonl", [triplet(0), bad, triplet(2)])
    with pytest.raises(DataError) as err:
        read_triplets(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)
    assert err.value.location == 2


def test_read_triplets_custom_fields_and_several_negatives(tmp_path):
    rows = [
        {"anchor": "a", "pos": "p", "negs": ["n1", "n2", "n3"]},
        {"anchor": "b", "pos": "q", "negs": "single"},
    ]
    path = write_lines(tmp_path / "t.jsonl", rows)
    got, _ = read_triplets(path, query_field="anchor", positive_field="pos", negative_field="negs")
    assert got == [Triplet("a", "p", ["n1", "n2", "n3"]), Triplet("b", "q", ["single"])]
    # no negative field at all is fine only when negative_field is None
    path2 = write_lines(tmp_path / "pairs.jsonl", [{"query": "q", "positive": "p"}])
    got2, _ = read_triplets(path2, negative_field=None)
    assert got2 == [Triplet("q", "p", [])]


def test_skip_mode_counts_reasons_and_keeps_first_messages(tmp_path):
    lines = [
        triplet(0),
        "not json",
        "42",
        {"query": "q"},
        {"query": "q", "positive": "", "negative": "n"},
        {"query": "q", "positive": 1, "negative": "n"},
        b"\xff\xfe",
        "",
        triplet(8),
        "also not json",
    ]
    path = write_lines(tmp_path / "t.jsonl", lines)
    rows, report = read_triplets(path, on_error="skip")
    assert [r.query for r in rows] == ["q0", "q8"]
    assert dict(report.skipped) == {
        "invalid_json": 2,
        "not_object": 1,
        "missing_field": 1,
        "empty_text": 1,
        "not_string": 1,
        "invalid_utf8": 1,
    }
    assert report.kept == 2 and report.blank == 1 and report.num_skipped == 7
    assert len(report.messages) == 5
    assert report.messages[0].startswith(f"{path}:2: invalid JSON")
    assert "skipped 7" in report.summary()


def test_empty_result_is_an_error(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ["oops", ""])
    with pytest.raises(DataError, match="no valid examples"):
        read_triplets(path, on_error="skip")
    empty = write_lines(tmp_path / "e.txt", ["", "   "])
    with pytest.raises(DataError, match="no valid examples"):
        read_sentences(empty)


def test_missing_file_gives_resolved_path_and_root_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFileNotFoundError) as err:
        read_triplets("data/x.jsonl")
    msg = str(err.value)
    assert "data/x.jsonl" in msg and str(tmp_path / "data" / "x.jsonl") in msg
    assert "data.root" in msg and "GRACE_DATA_ROOT" in msg
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, DataError)


def test_read_sentences_txt_and_jsonl(tmp_path):
    txt = write_lines(tmp_path / "s.txt", ["first sentence", "", "  second  ", b"bad \xc3"])
    with pytest.raises(DataError, match=r"s\.txt:4: not valid UTF-8"):
        read_sentences(txt)
    rows, report = read_sentences(txt, on_error="skip")
    assert rows == ["first sentence", "second"] and report.skipped["invalid_utf8"] == 1
    jl = write_lines(tmp_path / "s.jsonl", [{"sentence": "a"}, {"sentence": "  "}, {"x": 1}])
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'sentence': empty text"):
        read_sentences(jl, text_field="sentence")
    rows, _ = read_sentences(jl, text_field="sentence", on_error="skip")
    assert rows == ["a"]
    rows, report = read_sentences(txt, format="txt", on_error="skip", max_examples=1)
    assert rows == ["first sentence"] and report.truncated


def test_hub_loaders_validate_rows(monkeypatch):
    rows = [
        {"anchor": "a", "positive": "p", "negative": "n"},
        {"anchor": "b", "positive": "  ", "negative": "n"},
    ]
    calls = []

    def fake_load_dataset(hub_id, name=None, split=None, **kwargs):
        calls.append((hub_id, name, split, kwargs))
        return rows

    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset)
    )
    with pytest.raises(
        DataError, match=r"org/nli/triplet\[train\] row 1: field 'positive': empty text"
    ):
        load_hub_triplets("org/nli", name="triplet", query_field="anchor")
    got, report = load_hub_triplets(
        "org/nli", name="triplet", query_field="anchor", on_error="skip"
    )
    assert got == [Triplet("a", "p", ["n"])] and report.skipped["empty_text"] == 1
    sents, _ = load_hub_sentences("org/wiki", text_field="anchor", split="dev", streaming=True)
    assert sents == ["a", "b"] and calls[-1] == ("org/wiki", None, "dev", {"streaming": True})


# --------------------------------------------------------------------------- sampler


def test_sampler_deterministic_per_seed_and_epoch():
    data = list(range(50))
    a, b = (
        ResumableSampler(data, seed=7, rank=0, world_size=1),
        ResumableSampler(data, seed=7, rank=0, world_size=1),
    )
    assert list(a) == list(b) and sorted(a) == data
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == data
    assert list(ResumableSampler(data, seed=8, rank=0, world_size=1)) != first


def test_sampler_shards_whole_examples_by_rank():
    data = list(range(23))
    shards = [list(ResumableSampler(data, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [7, 7, 7]
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 21  # disjoint; the 2 that do not divide evenly are dropped
    full = ResumableSampler(data, seed=1, rank=0, world_size=1).order()
    assert set(flat) == set(full[:21])
    assert shards[1] == full[1:21:3]


def _loader(n: int, *, state=None, batch=4, seed=5, rank=0, world=1) -> ResumableDataLoader:
    data = [f"s{i}" for i in range(n)]
    loader = ResumableDataLoader(
        data,
        batch_size=batch,
        sampler=ResumableSampler(data, seed=seed, rank=rank, world_size=world),
        drop_last=True,
    )
    if state is not None:
        loader.load_state_dict(state)
    return loader


def test_sampler_resume_continues_identically():
    reference = _loader(30)
    uninterrupted = list(reference) + (reference.sampler.set_epoch(1) or list(reference))

    loader = _loader(30)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["position"] == 12
    resumed = _loader(30, state=json.loads(json.dumps(state)))  # survives serialisation
    rest = list(resumed)
    resumed.sampler.set_epoch(1)
    assert head + rest + list(resumed) == uninterrupted

    # the bare sampler resumes too
    s = ResumableSampler(list(range(30)), seed=5, rank=0, world_size=1)
    it = iter(s)
    taken = [next(it) for _ in range(11)]
    s2 = ResumableSampler(list(range(30)), seed=5, rank=0, world_size=1)
    s2.load_state_dict(s.state_dict())
    assert taken + list(s2) == s.order()


def test_resume_across_world_size_change_continues_global_order():
    loaders = [_loader(24, batch=2, rank=r, world=2) for r in range(2)]
    iters = [iter(x) for x in loaders]
    for it in iters:
        next(it)  # each rank consumed 2 examples -> 4 of the global order
    state = loaders[0].state_dict()
    one = _loader(24, batch=2, world=1, state=state)
    assert one.sampler.state_dict()["position"] == 4
    order = ResumableSampler(list(range(24)), seed=5, rank=0, world_size=1).order()
    assert [int(s[1:]) for b in one for s in b] == order[4:]


def test_lightning_checkpoint_resume_continues_data_order(tmp_path, caplog):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    caplog.set_level(logging.ERROR)
    path = write_lines(tmp_path / "s.txt", [f"s{i}" for i in range(22)])  # 5 batches/epoch

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(tuple(batch["text"]))
            return (self.w**2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def dm():
        return GraceDataModule(
            mode="unsup",
            unsup={"kind": "txt", "path": str(path)},
            val_fraction=0.0,
            prompts_per_step=4,
            seed=3,
        )

    def trainer(callbacks=()):
        return L.Trainer(
            max_steps=12,
            max_epochs=-1,
            logger=False,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = Recorder()
        ckpt = ModelCheckpoint(
            tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}"
        )
        trainer([ckpt]).fit(full, datamodule=dm())
        assert len(full.seen) == 12 and len(set(full.seen[:5])) == 5
        for k in (3, 5, 7):  # mid-epoch 0, epoch boundary, mid-epoch 1
            resumed = Recorder()
            trainer().fit(resumed, datamodule=dm(), ckpt_path=tmp_path / "ckpt" / f"step={k}.ckpt")
            assert full.seen[:k] + resumed.seen == full.seen, k


# --------------------------------------------------------------------------- datamodule


def test_val_split_is_first_fraction_unshuffled_and_batches_collate(tmp_path):
    path = write_lines(
        tmp_path / "t.jsonl", [triplet(i, negative=[f"n{i}", f"m{i}"]) for i in range(300)]
    )
    dm = GraceDataModule(
        mode="sup", sup={"kind": "jsonl", "path": "t.jsonl"}, root=tmp_path, prompts_per_step=8
    )
    dm.setup("fit")
    assert [t.query for t in dm.val_examples] == ["q0", "q1", "q2"]  # int(300 * 0.01)
    assert [t.query for t in dm.train_examples] == [f"q{i}" for i in range(3, 300)]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"query", "positive", "negatives"} and len(batch["query"]) == 8
    i = int(batch["query"][0][1:])
    assert batch["positive"][0] == f"p{i}" and batch["negatives"][0] == [f"n{i}", f"m{i}"]
    assert len(dm.train_dataloader()) == 297 // 8
    val = list(dm.val_dataloader())
    assert val[0]["query"] == ["q0", "q1", "q2"]
    dm0 = GraceDataModule(mode="sup", sup={"kind": "jsonl", "path": str(path)}, val_fraction=0.0)
    assert dm0.val_dataloader() == [] and len(dm0.train_examples) == 300


def test_filter_by_length_counts_the_policy_prompt(tmp_path):
    rows = [triplet(i, positive="w " * i, query="long " * 50) for i in range(1, 11)]
    write_lines(tmp_path / "t.jsonl", rows)
    dm = GraceDataModule(
        mode="sup",
        sup={"path": "t.jsonl"},
        root=tmp_path,
        val_fraction=0.2,
        max_prompt_tokens=6,
        prompts_per_step=1,
    )
    dm.load()
    seen = []

    def count(texts):
        seen.extend(texts)
        return [len(t.split()) for t in texts]

    report = dm.filter_by_length(count)
    assert all(t.startswith("w") for t in seen)  # positives counted, queries not
    assert [len(t.positive.split()) for t in dm.train_examples] == [3, 4, 5, 6]
    assert report["dropped_train"] == 4 and report["dropped_val"] == 0
    with pytest.raises(DataError, match="no training example"):
        dm.filter_by_length(count, max_tokens=1)

    write_lines(tmp_path / "s.txt", ["a b c", "a", "a b c d e"])
    dm2 = GraceDataModule(
        mode="unsup", unsup={"kind": "txt", "path": "s.txt"}, root=tmp_path, val_fraction=0
    )
    dm2.filter_by_length(count, max_tokens=3)
    assert dm2.train_examples == ["a b c", "a"]


def test_datamodule_config_errors(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        GraceDataModule(mode="both")
    dm = GraceDataModule(mode="sup", sup={"kind": "jsonl", "path": "x.jsonl", "pth": 1})
    with pytest.raises(ValueError, match="unknown keys"):
        dm.load()
    dm = GraceDataModule(mode="unsup", unsup={"kind": "txt", "path": "nope.txt"}, root=tmp_path)
    with pytest.raises(DataFileNotFoundError, match="nope.txt"):
        dm.load()
    write_lines(tmp_path / "s.txt", ["a", "b", "c"])
    dm = GraceDataModule(
        mode="unsup", unsup={"kind": "txt", "path": "s.txt"}, root=tmp_path, prompts_per_step=4
    )
    with pytest.raises(DataError, match="prompts_per_step=4"):
        dm.train_dataloader()


# --------------------------------------------------------------------------- offline default


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory) -> Path:
    """GRACE_CACHE root with the offline default built once (needs `pip install --no-deps
    gensim==4.4.0`)."""
    root = tmp_path_factory.mktemp("grace_cache")
    offline.ensure_offline_default(root / "data")
    return root


def test_offline_default_builds_real_triplets_and_sentences(offline_cache, monkeypatch):
    monkeypatch.setenv("GRACE_CACHE", str(offline_cache))
    paths = offline.ensure_offline_default()  # cached: no rebuild
    assert paths["sup"].parent.parent == offline_cache / "data"
    triplets, report = read_triplets(paths["sup"])
    assert report.num_skipped == 0 and len(triplets) > 1000
    assert len({t.query for t in triplets}) == len(triplets)
    for t in triplets[:200]:
        assert t.query != t.positive and t.negatives[0] not in (t.query, t.positive)
        assert len(t.positive.split()) >= 8 and t.positive[-1] in ".!?\"')"
        assert not any(c in t.positive + t.query for c in "{}[]|<>")
    sentences, _ = read_sentences(paths["unsup"])
    assert len(sentences) > 10000 and len(set(sentences)) == len(sentences)
    manifest = json.loads((paths["sup"].parent / "manifest.json").read_text())
    assert manifest["triplets"] == len(triplets) and "gensim" in manifest["install"]

    dm = GraceDataModule(mode="sup", prompts_per_step=4)  # default sources: offline
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["positive"]) == 4 and all(len(n) == 1 for n in batch["negatives"])
    dm_u = GraceDataModule(mode="unsup", unsup={"kind": "offline"}, prompts_per_step=4)
    assert len(next(iter(dm_u.train_dataloader()))["text"]) == 4


def test_offline_build_is_deterministic():
    wikitext = (
        "'''Foo''' is a [[bar|thing]].<ref>cite</ref> {{Infobox|x={{y}}}}\n\n"
        "== History ==\nFoo was made in 1900 by Dr. J. Smith in the town. It grew very fast over"
        " the years. People liked it a lot back then. The town then grew around it.\n\n"
        "== Use ==\n* a list item\nFoo is used for many different things today. It is cheap and"
        " easy to find. Many shops sell it now.\n\n== References ==\nIgnored paragraph here ok.\n"
    )
    sections = offline.wikitext_to_sections(wikitext)
    assert [h for h, _ in sections] == ["Introduction", "History", "Use"]
    assert sections[0][1] == ["Foo is a thing."]
    assert (
        offline.split_sentences(sections[1][1][0])[0]
        == "Foo was made in 1900 by Dr. J. Smith in the town."
    )
    articles = [offline.Article("Foo", sections), offline.Article("Bar", sections)]
    assert offline.build_triplets(articles, seed=1) == offline.build_triplets(articles, seed=1)
    assert offline.build_sentences(articles, seed=1) == offline.build_sentences(articles, seed=1)


def test_offline_missing_package_message(monkeypatch):
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gensim"):
        offline.find_source()


# --------------------------------------------------------------------------- configs + shared data


def _compose(name: str, mode: str, **extra):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "paths": {"root_dir": str(REPO)},
            "reward": {"mode": mode},
            "prompt": {"max_prompt_tokens": 1024},
            "seed": 0,
            "data": OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml"),
        }
    )
    for key, value in extra.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.mark.parametrize("name", ["offline", "shared", "paper", "hub"])
def test_data_configs_instantiate(name):
    from hydra.utils import instantiate

    for mode in ("sup", "unsup"):
        dm = instantiate(_compose(name, mode).data)
        assert isinstance(dm, GraceDataModule) and dm.mode == mode
        assert dm.max_prompt_tokens == 1024 and dm.val_fraction == 0.01
        dm._source_spec()  # keys and kinds are valid


def test_paper_config_missing_files_say_where(tmp_path, monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.setenv("GRACE_DATA_ROOT", str(tmp_path))
    dm = instantiate(_compose("paper", "sup").data)
    with pytest.raises(DataFileNotFoundError, match="echo_data_total.jsonl"):
        dm.load()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no shared data at {SHARED_DATA}")
def test_shared_config_reads_real_snli_and_wiki1m(monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.setenv("GRACE_DATA_ROOT", str(SHARED_DATA))
    dm = instantiate(_compose("shared", "sup").data)
    dm.load()
    assert len(dm.train_examples) + len(dm.val_examples) == 2954 and len(dm.val_examples) == 29
    first = dm.val_examples[0]
    assert first.query.startswith("Two women are embracing") and first.negatives == [
        "The men are fighting outside a deli ."
    ]
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["query"]) == 4 and len(batch["negatives"][0]) == 1

    dm_u = instantiate(_compose("shared", "unsup").data)
    dm_u.load()
    assert len(dm_u.train_examples) + len(dm_u.val_examples) == dm_u.read_report.kept > 11000
    assert dm_u.val_examples[0] == "YMCA in South Australia"


# --------------------------------------------------------------------------- Arrow store


def _sup_dm(tmp_path, name="t.jsonl", **kwargs) -> GraceDataModule:
    return GraceDataModule(
        mode="sup",
        sup={"kind": "jsonl", "path": name},
        root=tmp_path,
        cache_dir=tmp_path / "cache",
        val_fraction=0.1,
        prompts_per_step=2,
        max_prompt_tokens=3,
        **kwargs,
    )


def test_store_and_prompt_lengths_are_built_once_then_reused(tmp_path, monkeypatch):
    import grace_lightning.data.datamodule as dm_mod

    rows = [triplet(i, positive="w " * (1 + i % 5)) for i in range(40)]
    write_lines(tmp_path / "t.jsonl", rows)
    calls: list[int] = []

    def count(texts):
        calls.append(len(texts))
        return [len(t.split()) for t in texts]

    first = _sup_dm(tmp_path)
    first.filter_by_length(count, key="tok-A")
    assert sum(calls) == 40  # every policy prompt once (train and val)
    assert sorted(p.suffix for p in (tmp_path / "cache").glob("*/*.arrow")) == [".arrow"] * 2

    # a restart (or another rank): the file is not read again and nothing is re-tokenised
    def no_reading(*args, **kwargs):
        raise AssertionError("read the data file again")

    monkeypatch.setattr(dm_mod, "iter_triplets", no_reading)
    again = _sup_dm(tmp_path)
    again.filter_by_length(count, key="tok-A")
    assert sum(calls) == 40
    assert list(again.train_examples) == list(first.train_examples)
    assert list(again.val_examples) == list(first.val_examples)
    assert again.read_report.kept == 40 and again.length_report == first.length_report
    assert all(len(t.positive.split()) <= 3 for t in again.train_examples)
    # another tokenizer/prompt: counted again (once)
    _sup_dm(tmp_path).filter_by_length(count, key="tok-B")
    assert sum(calls) == 80

    # the file changed: a new store (the old one is not trusted)
    monkeypatch.undo()
    write_lines(tmp_path / "t.jsonl", rows + [triplet(99)])
    changed = _sup_dm(tmp_path)
    changed.load()
    assert changed.read_report.kept == 41


def test_bad_line_through_the_store_names_file_line_field_and_stores_nothing(tmp_path):
    rows = [triplet(0), triplet(1), triplet(2, positive="   "), triplet(3)]
    path = write_lines(tmp_path / "t.jsonl", rows)
    for _ in range(2):  # nothing half-built is picked up by the second attempt
        with pytest.raises(DataError) as err:
            _sup_dm(tmp_path).load()
        assert str(err.value) == f"{path}:3: field 'positive': empty text"
    assert not list((tmp_path / "cache").glob("*/*.arrow"))
    assert not list((tmp_path / "cache").glob("*/report.json"))


def _build_in_child(tmp_path, log_path) -> None:
    def count(texts):
        with open(log_path, "a") as f:
            f.write(f"{len(texts)}\n")
        return [len(t.split()) for t in texts]

    _sup_dm(tmp_path).filter_by_length(count, key="tok-A")


def test_concurrent_ranks_build_the_store_and_lengths_once(tmp_path):
    import multiprocessing

    write_lines(tmp_path / "t.jsonl", [triplet(i, positive="w " * (1 + i % 5)) for i in range(400)])
    log_path = tmp_path / "counted.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_child, args=(tmp_path, log_path)) for _ in range(4)]
    for p in procs:  # like 4 DDP ranks starting together (no process group yet)
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert sum(int(x) for x in log_path.read_text().split()) == 400  # tokenised once in all
    assert len(list((tmp_path / "cache").glob("*/data.arrow"))) == 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_store_backed_batches_follow_the_rank_sharded_order(tmp_path, world):
    write_lines(tmp_path / "t.jsonl", [triplet(i) for i in range(50)])
    examples = [f"q{i}" for i in range(5, 50)]  # the first 10 % (5) are validation
    for rank in range(world):
        dm = _sup_dm(tmp_path, rank=rank, world_size=world, seed=7)
        dm.prompts_per_step = 2 * world  # global: 2 a rank
        dm.load()
        got = [q for b in dm.train_dataloader() for q in b["query"]]
        order = ResumableSampler(examples, seed=7, rank=rank, world_size=world).order()
        usable = len(order) // 2 * 2  # whole batches of prompts_per_step=2
        assert got == [examples[i] for i in order[:usable]]
