"""The render package's layout: each stage's helpers live with their stage, and only the pipeline
sequences stages (so only it imports more than one stage's package)."""

from __future__ import annotations

import ast
from pathlib import Path

from shared.stages import RENDER_STAGES, Stage

ROOT = Path(__file__).resolve().parent.parent
RENDER = ROOT / "job" / "render"
# each stage's code: a package or module under job/render (the RVC engine belongs to the conversion)
STAGE_CODE = {
    "fetch": ("fetch",),
    "separate": ("separate",),
    "convert": ("convert", "rvc"),
    "quality": ("quality",),
    "mix": ("mix",),
}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["job", "render"] or len(parts) < 3:
        return None
    return next((stage for stage, tops in STAGE_CODE.items() if parts[2] in tops), None)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_stage_imports_another_stages_code():
    crossings = []
    for path in RENDER.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = stage_of(module)
        if own is None:
            continue
        for imported in imports(path):
            other = stage_of(imported)
            if other is not None and other != own:
                crossings.append(f"{module} imports {imported}")
    assert crossings == []


def test_the_checker_sees_a_crossing(tmp_path):
    """The rule above can fail: a mix module that imports the quality meter is a crossing."""
    probe = tmp_path / "probe.py"
    probe.write_text("from job.render.quality.meter import QualityMeter\n")
    assert stage_of("job.render.mix.mixer") == "mix"
    assert {stage_of(m) for m in imports(probe)} == {"quality"}


def test_every_stage_the_pipeline_runs_has_its_code_and_a_place_in_the_docs():
    assert {s.value for s in RENDER_STAGES} - {Stage.REPAIR.value} == set(STAGE_CODE)
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    for stage in Stage:
        assert f"`{stage.value}`" in architecture, f"docs/architecture.md does not name the stage {stage.value}"
