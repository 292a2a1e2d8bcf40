"""Every single-run ``python train.py ...`` line users are shown composes and validates.

``python train.py`` applies the quickstart preset after every group, so a documented command
that worked on the group defaults can stop doing what its comment says (a contrastive method's
lr replaced, the unsupervised reward run with supervised settings). These lines come from
README.md, sweeps/README.md, train.py's docstring and the comments in conf/; multirun lines are
tests/test_sweeps.py's, cluster launcher lines tests/test_launchers.py's.
"""

from __future__ import annotations

import re

import pytest

from grace_lightning.config import validate

from .conftest import ROOT
from .test_train import make_cfg

SOURCES = [ROOT / "README.md", ROOT / "sweeps" / "README.md", ROOT / "train.py"]
SOURCES += sorted((ROOT / "conf").rglob("*.yaml"))


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, overrides) of every documented single run of train.py."""
    found = []
    for path in SOURCES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if path.suffix == ".yaml":  # commands sit in comments there: "#   python train.py"
                line = line.strip()[1:] if line.strip().startswith("#") else ""
            for part in line.split("&&"):
                m = re.search(r"python train\.py(?: (.*))?$", part.split(" #")[0].strip(" `\\"))
                if not m or "`" in (m.group(1) or ""):
                    continue
                overrides = (m.group(1) or "").split()
                if overrides[:1] == ["-m"] or any(
                    "<" in o or "..." in o or o.startswith("hydra/launcher=") for o in overrides
                ):
                    continue  # multiruns, placeholders, cluster launchers: tested elsewhere
                found.append((f"{path.relative_to(ROOT)}:{n}", overrides))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_enough_commands():
    assert len(COMMANDS) >= 30
    assert ("README.md", []) in [(w.split(":")[0], o) for w, o in COMMANDS]


@pytest.mark.parametrize("where,overrides", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_composes_and_validates(where, overrides, tmp_path):
    # what `python train.py <overrides>` composes: train.yaml's default experiment (quickstart)
    validate(make_cfg(overrides, tmp_path, preset="quickstart"))
