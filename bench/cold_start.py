"""Start-to-first-stage time of a Cloud Run Job execution: models in the image, or downloaded.

    python -m bench.cold_start            (make bench-cold-start)

Each execution is a new process with a model folder of its own. Before its first stage (the song's
download) it imports the job's code and syncs the base models against the bucket's
``models/manifest.json`` (:meth:`shared.model_store.ModelStore.sync`). Rows, each a fresh process:

* empty folder: what every execution paid before the models were baked into the image (all of them
  downloaded from the bucket and hash-checked);
* baked folder: the image's models, already equal to the manifest (each file hash-checked,
  nothing downloaded): what an execution pays now;
* baked, one file changed in the bucket since the build: that file is downloaded, the rest kept.

The bucket is moto's S3 server on 127.0.0.1 holding real-size models with random weights in the
real formats (the sizes are what matters here), so the download rows are loopback's speed: from
R2 to Cloud Run expect them slower, which only widens the gap. Prints a table and writes it to
``bench/RESULTS-cold-start.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(models: str) -> None:
    """In the measured process: import the job, sync the models, print when each was done."""
    from job.service.worker import Worker
    from shared.settings import Settings

    imported = time.time()
    report = Worker(Settings(models_dir=Path(models))).models.sync()
    print(json.dumps({"imported": imported, "synced": time.time(), "downloaded": len(report.downloaded)}))


def _measure(env: dict[str, str], models: Path) -> dict:
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "bench.cold_start", "--child", str(models)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {
        "import_s": result["imported"] - started,
        "first_stage_s": result["synced"] - started,
        "downloaded": result["downloaded"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each row (the median is shown)")
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    import boto3
    from pydantic import SecretStr

    from job.devkit import demo
    from job.devkit.stack import start_s3, stop
    from shared.model_store import ModelStore
    from shared.settings import Settings
    from shared.storage import make_storage

    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    proc, endpoint = start_s3(work / "s3.log")
    try:
        bucket = f"cold-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
        ).create_bucket(Bucket=bucket)
        env = {
            **os.environ,
            "COVER_STORAGE": "s3",
            "COVER_BUCKET": bucket,
            "COVER_S3_ENDPOINT": endpoint,
            "COVER_S3_REGION": "us-east-1",
            "COVER_S3_ACCESS_KEY_ID": "t",
            "COVER_S3_SECRET_ACCESS_KEY": "t",
        }
        source = work / "source"
        demo.write_models(source, size="real")
        settings = Settings(
            storage="s3",
            bucket=bucket,
            s3_endpoint=endpoint,
            s3_region="us-east-1",
            s3_access_key_id=SecretStr("t"),
            s3_secret_access_key=SecretStr("t"),
        )
        store = ModelStore(source, make_storage(settings))
        manifest = store.push()
        total_mb = sum(d.size for d in manifest.files.values()) / 1e6
        rows: dict[str, list[dict]] = {"empty folder": [], "baked folder": [], "baked, one file changed since": []}
        for _ in range(args.repeat):
            empty = work / f"empty-{uuid.uuid4().hex[:6]}"
            rows["empty folder"].append(_measure(env, empty))
            rows["baked folder"].append(_measure(env, empty))  # the same folder, now equal to the manifest
            changed = sorted(manifest.files, key=lambda rel: manifest.files[rel].size)[0]
            with (empty / changed).open("ab") as file:
                file.write(b"stale")  # as if the bucket's file had changed after the build
            rows["baked, one file changed since"].append(_measure(env, empty))
            shutil.rmtree(empty)
    finally:
        stop(proc)
        shutil.rmtree(work, ignore_errors=True)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    lines = [
        f"# Cold start of a job execution ({date.today()}, {os.cpu_count()} cores, `python -m bench.cold_start`)",
        "",
        f"Base models: {len(manifest.files)} files, {total_mb:.0f} MB (real sizes, random weights); the bucket on "
        "loopback. Median of "
        f"{args.repeat} fresh processes.",
        "",
        "| model folder at start | files downloaded | imports done | first stage starts |",
        "| --- | --- | --- | --- |",
    ]
    for name, runs in rows.items():
        lines.append(
            f"| {name} | {runs[0]['downloaded']} | {median([r['import_s'] for r in runs]):.2f} s | "
            f"{median([r['first_stage_s'] for r in runs]):.2f} s |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    (ROOT / "bench" / "RESULTS-cold-start.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
