"""What Content Credentials cost: ``python -m bench.provenance [--seconds 210] [--cover-s 540]``.

A mix of the given length (noise at mix level, which encodes like music) is encoded in each format
that carries credentials, then signed (``job/render/credentials.py``, the development key) and
checked, each timed; the signing time is given as a share of a whole cover's time on this
machine (``--cover-s``: measured by ``python -m bench.pipeline``; 540 s is the 3.5-minute cover on
the 2-core AVX2 CPU, docs/performance.md). Prints Markdown rows.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=210.0, help="the mix's length")
    parser.add_argument("--cover-s", type=float, default=540.0, help="a whole cover's time here, seconds")
    args = parser.parse_args()
    import numpy as np

    from job.render import credentials
    from job.render.media.audio import MIX_SAMPLE_RATE, write_wav
    from shared.options import FORMATS
    from shared.provenance import verify

    facts = credentials.CoverFacts(
        title="bench", song="bench", song_sha256="00" * 32, voices=[], actions=["bench"], verdict=None
    )
    print(f"| format ({args.seconds:.0f} s mix) | size MB | sign s | verify s | sign / cover |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        who = credentials.identity(None, None, None, work / "state")
        rng = np.random.default_rng(0)
        mix = (0.1 * rng.standard_normal((2, int(args.seconds * MIX_SAMPLE_RATE)))).astype(np.float32)
        wav = write_wav(work / "mix.wav", mix, MIX_SAMPLE_RATE)
        for fmt, media_type in credentials.MEDIA_TYPES.items():
            spec = FORMATS[fmt]
            out = work / f"cover.{spec.extension}"
            codec = [x for k, v in spec.codec.items() for x in (f"-{k}", v)]
            cmd = ["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), *codec, "-f", spec.muxer, str(out)]
            subprocess.run(cmd, check=True)
            started = time.perf_counter()
            credentials.sign(out, media_type, facts, who)
            signed = time.perf_counter() - started
            started = time.perf_counter()
            assert verify(out, who.trusted_pem).status.value == "verified"
            checked = time.perf_counter() - started
            share = signed / args.cover_s
            size = out.stat().st_size / 1e6
            print(f"| {fmt.value} | {size:.1f} | {signed:.3f} | {checked:.3f} | {share:.3%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
