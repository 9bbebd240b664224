"""The HTTP functions' environment: a virtual environment with only the core dependencies (`pip
install .`, no extras), what the dispatcher is deployed with. Rebuilt when pyproject.toml or the
command line's code changes (the venv holds an installed copy of it). ``make test`` builds it
before pytest starts (``python tests/dispatcher_venv.py``), as it builds the main one; the suite's
fixture uses it, building it only where it is missing or stale."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure(root: Path = ROOT) -> Path:
    """The environment's ``bin`` folder, built or rebuilt first where needed."""
    venv = root / ".venv-dispatcher"
    stamp = venv / "pyproject.sha256"
    sources = [root / "pyproject.toml", *sorted((root / "job" / "cli").glob("*.py"))]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()
    if not stamp.is_file() or stamp.read_text() != digest:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(root)], check=True, timeout=900)
        stamp.write_text(digest)
    return venv / "bin"


if __name__ == "__main__":
    print(ensure())
