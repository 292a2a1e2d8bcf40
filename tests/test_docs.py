"""The docs site builds, README stays a front page, and nothing in the repository points outside it.

``mkdocs build --strict`` with mkdocs.yml's ``validation`` settings fails on a link to a missing
page or image, a ``#anchor`` that no heading has, and a page left out of the nav; the command
lines the pages show are composed by tests/test_readme_commands.py and tests/test_sweeps.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target), ![alt](src)
# the development machines' checkout root (written [k] so that this line does not match itself)
ABSOLUTE_WORK = re.compile(r"(?<![\w.~-])/wor[k]/")
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg", ".json", ".cff"}


def mkdocs_build(config: Path, site_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config)]
        + ["--site-dir", str(site_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def repo_files() -> list[Path]:
    """Tracked files and new files git does not ignore (what a commit would hold)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ROOT / p for p in out.split("\0") if p and (ROOT / p).is_file()]


def relative_links(text: str) -> list[str]:
    """Link and image targets of markdown ``text`` that are paths (no URL, no bare #anchor)."""
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.I)]


def test_docs_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    run = mkdocs_build(ROOT / "mkdocs.yml", site)
    assert run.returncode == 0, run.stdout + run.stderr
    for page in ("index.html", "paper/index.html", "configuration/index.html", "study/index.html"):
        assert (site / page).is_file(), page


def test_strict_build_fails_on_a_broken_link_or_an_unlisted_page(tmp_path):
    """The build in the test above can fail: a copy of the site with one broken anchor, and one
    with a page missing from the nav, are refused."""
    for breakage in ("link", "page"):
        copy = tmp_path / breakage
        shutil.copytree(ROOT / "docs", copy / "docs")
        shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        if breakage == "link":
            with open(copy / "docs" / "index.md", "a") as f:
                f.write("\nSee [the data](paper.md#no-such-heading).\n")
        else:
            (copy / "docs" / "orphan.md").write_text("# Not in the nav\n")
        run = mkdocs_build(copy / "mkdocs.yml", copy / "site")
        assert run.returncode != 0, breakage
        assert ("no-such-heading" if breakage == "link" else "orphan.md") in run.stdout + run.stderr


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail to docs/"


def test_no_link_leaves_the_repository():
    """Every relative link of every markdown file resolves to a file inside the repository."""
    bad = []
    for path in repo_files():
        if path.suffix != ".md":
            continue
        for target in relative_links(path.read_text()):
            file = target.split("#")[0]
            resolved = (path.parent / file).resolve()
            if not resolved.is_relative_to(ROOT.resolve()) or not resolved.exists():
                bad.append(f"{path.relative_to(ROOT)}: {target}")
    assert not bad, "links outside the repository or to missing files:\n" + "\n".join(bad)


def test_user_pages_name_the_data_root_not_a_folder_outside():
    """README and the docs explain $GRACE_DATA_ROOT instead of pointing at ../shared."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    bad = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in pages
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "../shared" in line
    ]
    assert not bad, bad


def test_no_absolute_path_of_a_development_machine():
    bad = []
    for path in repo_files():
        if path.suffix not in TEXT_SUFFIXES:
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if ABSOLUTE_WORK.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not bad, "absolute paths of the machine this was written on:\n" + "\n".join(bad)


def test_the_link_checks_see_what_they_should():
    text = (
        "[a](docs/x.md) ![b](img.png) [c](https://e.org/a) [d](#top) [e](../shared/docs/n.md#s)"
        ' [f](mailto:x@y.z) [g](paper.md "title")'
    )
    assert relative_links(text) == ["docs/x.md", "img.png", "../shared/docs/n.md#s", "paper.md"]
    assert ABSOLUTE_WORK.search("see " + "/work" + "/shared/data/README.md")  # not in this file
    assert not ABSOLUTE_WORK.search("hydra.run.dir=outputs/work/x")
