"""Packaging: licence, citation, changelog, and extras for what serves one option."""

from __future__ import annotations

import importlib.util
import re

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from grace_lightning.config import ConfigError, validate

from .conftest import ROOT
from .test_train import TINY, make_cfg

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_one_option_dependencies_are_extras():
    core = _names(PROJECT["dependencies"])
    extras = PROJECT["optional-dependencies"]
    assert not {"wandb", "matplotlib", "peft"} & core, core
    assert "sentence-transformers" in core  # the README's usage of an export needs it
    assert _names(extras["wandb"]) == {"wandb"}
    assert _names(extras["lora"]) == {"peft"}
    assert _names(extras["study"]) == {"matplotlib"}
    for name in ("all", "dev"):  # dev installs every extra the tests import
        assert "grace-lightning[wandb,lora,study]" in extras[name], extras[name]


@pytest.mark.parametrize(
    ("override", "module", "extra"),
    [("logger=wandb", "wandb", "wandb"), ("peft=lora", "peft", "lora")],
)
def test_option_without_its_extra_stops_at_config_time(
    monkeypatch, tmp_path, override, module, extra
):
    cfg = make_cfg([*TINY, override], tmp_path)
    validate(cfg)  # installed here: accepted
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    with pytest.raises(ConfigError, match=re.escape(f"pip install 'grace-lightning[{extra}]'")):
        validate(cfg)
    validate(make_cfg(TINY, tmp_path))  # without the option nothing needs it


def test_licence_citation_changelog():
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
    assert cff["version"] == PROJECT["version"]
    paper = cff["preferred-citation"]
    assert "2510.04506" in paper["url"] and paper["authors"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{PROJECT['version']}]" in changelog
