"""Networks built around their checkpoints' tensors (job/render/rvc/weights.py): the same network
as the usual construct-then-load, without holding the weights twice while loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from job.render.rvc.weights import build_with_weights
from shared.model_store import ModelStore


def small() -> nn.Module:
    return nn.Sequential(nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8), nn.GRU(8, 6, batch_first=True))


def test_the_network_is_the_one_loading_its_state_gives():
    torch.manual_seed(0)
    source = small()
    source[1].running_mean.uniform_()  # buffers travel too
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    usual = small()
    usual.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    usual.eval()
    state = dict(half)
    built = build_with_weights(small, state)
    assert not state, "the checkpoint's dict is emptied as its tensors are taken"
    assert not built.training
    for (name, a), (_, b) in zip(usual.state_dict().items(), built.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    x = torch.randn(2, 4, 20)
    with torch.inference_mode():
        conv = lambda m: m[2](m[1](m[0](x)).transpose(1, 2))[0]  # noqa: E731
        assert torch.equal(conv(usual), conv(built))


def test_a_checkpoint_that_does_not_fit_is_refused():
    state = small().state_dict()
    state.pop("0.bias")
    with pytest.raises(RuntimeError, match=r"0\.bias"):
        build_with_weights(small, state)
    wrong = small().state_dict()
    wrong["0.weight"] = torch.zeros(8, 4, 5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_with_weights(small, wrong)


MEASURE_LOAD = """
import gc, sys
from pathlib import Path
from job.render.compute import release_freed_memory
from job.render.rvc.rmvpe import RMVPE


def rss_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


gc.collect()
release_freed_memory(0)
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # VmHWM starts again from the current RSS
before = rss_mb("VmRSS")
rmvpe = RMVPE.load(Path(sys.argv[1]))
kept = sum(t.numel() * t.element_size() for t in rmvpe.model.state_dict().values()) / 2**20
print(rss_mb("VmHWM") - before, kept)
"""


def test_loading_rmvpe_holds_its_weights_about_once(store):
    """RMVPE ships in half precision (172 MB) and runs in float32 (345 MB). Building a random
    network and loading a float32 copy of the file into it peaked 2.5 times what it keeps (862 MB
    over the RSS before, measured); built around the converted tensors it peaks at about what it
    keeps (1.06 times). Measured in a fresh process (in a long-lived one, freed heap that is not
    given back blurs the peak: 1.45 times in the suite's process), peak RSS from /proc (Linux),
    reset just before the load."""
    path = ModelStore(store).pitch_model()
    root = Path(__file__).resolve().parents[1]  # the repository, where `job` imports from
    run = subprocess.run(
        [sys.executable, "-c", MEASURE_LOAD, str(path)], capture_output=True, text=True, check=True, cwd=root
    )
    peak, kept = (float(v) for v in run.stdout.split())
    assert kept > 300 and peak < 1.4 * kept, f"peaked {peak:.0f} MB over the RSS before; keeps {kept:.0f} MB"
