"""Files shipped inside installed wheels (the quality models' weights), found without importing their packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def wheel_file(package: str, *parts: str) -> Path:
    """A file shipped inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
