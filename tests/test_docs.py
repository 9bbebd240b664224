"""The README and docs: a README a user reads (short), links that resolve to files and headings in
the repo, and commands that exist (make targets, ``cover`` subcommands, ``python -m`` modules)."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from job.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "bench" / "JOURNAL.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def links(path: Path) -> list[str]:
    return [target for target in LINK.findall(path.read_text()) if not re.match(r"[a-z]+:", target)]


def test_the_readme_is_a_guide_not_a_notebook():
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_MAX_LINES


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_to_a_file_and_heading_in_the_repo(doc):
    broken = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            broken.append(target)
    assert broken == []


def test_the_link_checker_sees_a_broken_link(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\n[gone](missing.md) [here](#title) [nowhere](#no-such-heading)\n")
    assert links(doc) == ["missing.md", "#title", "#no-such-heading"]
    assert slug("Title") in anchors(doc) and "no-such-heading" not in anchors(doc)


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def test_the_commands_the_readme_names_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    cover = subcommands(build_parser())
    seen = 0
    for command in readme_commands():
        words = command.split()
        if words[0] == "make":
            assert words[1] in targets, command
        elif words[0] == "cover":
            assert words[1] in cover, command
            for sub in words[2].split("|") if words[1] == "models" else []:
                assert sub in subcommands(cover["models"]), command
        elif words[0] == "bash":
            assert (ROOT / words[1]).is_file(), command
        else:
            continue
        seen += 1
    assert seen >= 8  # the quick start, the command line and development blocks were read


def test_every_python_module_the_docs_run_exists():
    named = {m for doc in DOCS for m in re.findall(r"python -m ([\w.]+)", doc.read_text())}
    assert named, "the docs name their commands"
    missing = sorted(m for m in named if importlib.util.find_spec(m) is None)
    assert missing == []
