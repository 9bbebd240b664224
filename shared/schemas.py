"""Writes the JSON Schemas of the request and event models into ``schemas/`` (the Catalog's contract).

python -m shared.schemas          # regenerate
python -m shared.schemas --check  # exit 1 if the files drift from the models
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from shared.events import EVENT_MODELS, CoverStatus

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def schemas() -> dict[str, str]:
    models: dict[str, type[BaseModel]] = {**EVENT_MODELS, "cover.status": CoverStatus}
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for name, model in models.items()
    }


def main(argv: list[str]) -> int:
    expected = schemas()
    if "--check" in argv:
        drift = [
            n for n, text in expected.items() if not (SCHEMA_DIR / n).is_file() or (SCHEMA_DIR / n).read_text() != text
        ]
        for name in drift:
            print(f"schema drift: schemas/{name} (run python -m shared.schemas)")
        return 1 if drift else 0
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, text in expected.items():
        (SCHEMA_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
