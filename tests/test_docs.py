"""The README and docs: a README a user reads (short), links that resolve to files and headings in
the repo, and commands that exist (make targets, ``cover`` subcommands, ``python -m`` modules)."""

from __future__ import annotations

import argparse
import ast
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
    """Every make target, script and ``cover`` subcommand the README names exists; every flag of a
    ``cover`` synopsis (continuation lines included) is one the subcommand takes, and a flag's
    listed values (``--format mp3|opus|...``) are exactly the ones it accepts."""
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    cover = subcommands(build_parser())
    seen, flags_seen, current = 0, 0, None
    for command in readme_commands():
        words = command.split()
        if words[0] == "make":
            assert words[1] in targets, command
        elif words[0] == "cover":
            assert words[1] in cover, command
            current = cover[words[1]]
            for sub in words[2].split("|") if words[1] == "models" else []:
                assert sub in subcommands(cover["models"]), command
                current = subcommands(cover["models"])[sub]
        elif words[0] == "bash":
            assert (ROOT / words[1]).is_file(), command
        elif not words[0].startswith("["):
            current = None
            continue
        seen += 1
        options = {o: a for a in (current._actions if current else []) for o in a.option_strings}
        for flag, values in re.findall(r"(--[a-z][\w-]*)(?: ([\w.-]+(?:\|[\w.-]+)+))?", command):
            assert flag in options, f"{command}: cover {current.prog.split()[-1]} has no {flag}"
            if values and options[flag].choices is not None:
                assert set(values.split("|")) == {str(c) for c in options[flag].choices}, command
            flags_seen += 1
    assert seen >= 8 and flags_seen >= 8  # the quick start, the command line and development blocks were read


def test_every_python_module_the_docs_run_exists():
    named = {m for doc in DOCS for m in re.findall(r"python -m ([\w.]+)", doc.read_text())}
    assert named, "the docs name their commands"
    missing = sorted(m for m in named if importlib.util.find_spec(m) is None)
    assert missing == []


ENTRY_POINT_MIN_PARAMETERS = 4


def undocumented_parameters(path: Path) -> list[str]:
    """Public functions and classes of ``path`` with four or more parameters whose docstring does
    not name each one (a method overriding one of a base class in the module inherits its doc)."""
    tree = ast.parse(path.read_text())
    documented_methods = {
        (fn.name)
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef)
        for fn in cls.body
        if isinstance(fn, ast.FunctionDef) and ast.get_docstring(fn)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
            continue
        fn = node
        if isinstance(node, ast.ClassDef):
            fn = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            if fn is None:
                continue
        params = [a.arg for a in fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
        if len(params) < ENTRY_POINT_MIN_PARAMETERS:
            continue
        doc = (ast.get_docstring(node) or "") + (ast.get_docstring(fn) or "")
        if not doc and node.name in documented_methods:
            continue  # an override: the base class's method says it
        missing = [p for p in params if not re.search(rf"\b{p}\b", doc)]
        if missing:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {', '.join(missing)}")
    return found


def test_every_public_entry_point_with_four_or_more_parameters_names_each_one():
    """As whisper's ``transcribe`` and demucs' ``apply_model`` do: the product code's public
    functions and classes taking four or more parameters say what each one is."""
    sources = [p for top in ("job", "shared", "dispatcher") for p in (ROOT / top).rglob("*.py")]
    assert [line for p in sources for line in undocumented_parameters(p)] == []


def test_the_parameter_rule_sees_an_undocumented_one(tmp_path):
    probe = ROOT / "tests" / "probe_for_the_rule.py"
    try:
        probe.write_text('def render(song, voice, out, options):\n    """A cover of ``song`` by ``voice``."""\n')
        assert undocumented_parameters(probe) == ["tests/probe_for_the_rule.py:1 render: out, options"]
    finally:
        probe.unlink()


def test_the_notices_name_every_model_asset_the_code_fetches_or_scores_with():
    from job.cli.base_models import PUBLIC_MODELS

    notices = (ROOT / "THIRD_PARTY_NOTICES.md").read_text()
    fetched = [Path(m.member or m.url).name for m in PUBLIC_MODELS]
    quality = ["CREPE", "pretrained.pt", "sig_bak_ovr.onnx"]
    assert [name for name in [*fetched, *quality] if name not in notices] == []
    assert "proprietary" in (ROOT / "LICENSE").read_text().lower()
