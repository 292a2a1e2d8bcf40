"""Every single-run ``python train.py ...`` line users are shown composes and validates.

``python train.py`` applies a preset after every group (``experiment=auto``: the quickstart on the
embedded model, the paper recipe on a paper backbone), so a documented command that worked on the
group defaults can stop doing what its comment says (a contrastive method's lr replaced, the
unsupervised reward run with supervised settings). These lines come from
README.md, the docs site (docs/**/*.md: code blocks and inline code), sweeps/README.md, train.py's
docstring and the comments in conf/; multirun lines are tests/test_sweeps.py's, cluster launcher
lines tests/test_launchers.py's. A line is split as the shell splits it (quotes), and a
``PYTHONPATH=<dir>`` in front of it (docs/extending.md: a module of the user's own) is put on
``sys.path`` while the line is composed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from grace_lightning.config import validate
from grace_lightning.presets import resolve_overrides

from .conftest import ROOT
from .test_train import make_cfg

MARKDOWN = [ROOT / "README.md", ROOT / "sweeps" / "README.md"]
MARKDOWN += sorted((ROOT / "docs").rglob("*.md"))
SOURCES = [*MARKDOWN, ROOT / "train.py", *sorted((ROOT / "conf").rglob("*.yaml"))]
INLINE = re.compile(r"`([^`]*python train\.py[^`]*)`")  # `python train.py ...` in running text


def candidate_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the places in ``path`` where a command can be written."""
    out = []
    fenced = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if path.suffix == ".yaml":  # commands sit in comments there: "#   python train.py"
            if line.strip().startswith("#"):
                out.append((n, line.strip()[1:]))
        elif path.suffix == ".md":
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced:  # a code block: the line is a shell command (or program output)
                out.append((n, line))
            else:  # running text and tables: only inline code spans
                out += [(n, span) for span in INLINE.findall(line)]
        else:
            out.append((n, line))
    return out


def shell_words(text: str) -> list[str]:
    """``text`` split into words as a POSIX shell does (quotes removed); plain split if the
    quoting does not parse."""
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def documented_commands(
    sources: list[Path] = SOURCES, root: Path = ROOT
) -> list[tuple[str, list[str], str | None]]:
    """(where, overrides, PYTHONPATH or None) of every documented single run of train.py."""
    found = []
    for path in sources:
        for n, line in candidate_lines(path):
            for part in line.split("&&"):
                command = part.split(" #")[0].strip(" `\\")
                m = re.search(r"python train\.py(?: (.*))?$", command)
                if not m or "`" in (m.group(1) or ""):
                    continue
                env = re.search(r"(?:^|\s)PYTHONPATH=(\S+)\s+python train\.py", command)
                overrides = shell_words(m.group(1) or "")
                if overrides[:1] == ["-m"] or any(
                    "<" in o or "..." in o or o.startswith("hydra/launcher=") for o in overrides
                ):
                    continue  # multiruns, placeholders, cluster launchers: tested elsewhere
                where = f"{path.relative_to(root)}:{n}"
                found.append((where, overrides, env.group(1) if env else None))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_enough_commands():
    assert len(COMMANDS) >= 30
    where = {w.split(":")[0] for w, _, _ in COMMANDS}
    assert ("README.md", []) in [(w.split(":")[0], o) for w, o, _ in COMMANDS]
    # the commands that moved out of README.md into the docs site are still read from there
    assert {"docs/training.md", "docs/paper.md", "docs/cluster.md"} <= where


def test_inline_and_table_commands_are_read(tmp_path):
    """A command in a table cell or in running text is checked like one in a code block;
    program output and prose around it are not commands."""
    page = tmp_path / "page.md"
    page.write_text(
        "| `python train.py backbone=qwen reward=sup` | GPU |\n"
        "Run `python train.py debug=fdr` first.\n"
        "```bash\npython train.py peft=lora   # LoRA\n"
        "PYTHONPATH=ext python train.py '+reward.terms.x={_target_:m.f,weight:1}'\n```\n"
        "python train.py in prose is not a command\n"
    )
    assert documented_commands([page], tmp_path) == [
        ("page.md:1", ["backbone=qwen", "reward=sup"], None),
        ("page.md:2", ["debug=fdr"], None),
        ("page.md:4", ["peft=lora"], None),
        ("page.md:5", ["+reward.terms.x={_target_:m.f,weight:1}"], "ext"),
    ]


@pytest.mark.parametrize("where,overrides,pythonpath", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_documented_command_composes_and_validates(
    where, overrides, pythonpath, tmp_path, monkeypatch
):
    if pythonpath:  # the line's own PYTHONPATH=<dir>, relative to the checkout
        monkeypatch.syspath_prepend(str(ROOT / pythonpath))
    # what `python train.py <overrides>` composes: train.yaml's default experiment (auto), which
    # train.py resolves from backbone/reward/method before Hydra composes
    validate(make_cfg(resolve_overrides(overrides), tmp_path, preset="auto"))
