"""Networks built around their checkpoints' tensors (job/render/weights.py): the same network as
the usual construct-then-load, without holding the weights twice while loading, without
allocating what a declaration asks past its limit, and without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from job.render.weights import TooLargeError, build_unfilled, build_with_weights
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


def test_a_declaration_past_its_limit_is_refused_before_it_allocates():
    started = time.monotonic()
    with pytest.raises(TooLargeError):  # 4 TB of float32 asked for: sized on the meta device, never allocated
        build_unfilled(lambda: nn.Linear(1 << 20, 1 << 20), limit_bytes=1 << 20)
    assert time.monotonic() - started < 5
    built = build_unfilled(lambda: nn.Linear(64, 32), limit_bytes=1 << 20)
    assert built.module.weight.shape == (32, 64)


class _SelfInitialised(nn.Module):
    """A module with a tensor no checkpoint carries (a buffer it initialises itself, not saved)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3)
        self.register_buffer("table", nn.init.normal_(torch.empty(4)), persistent=False)


def test_a_tensor_the_module_initialises_itself_and_does_not_save_is_refused():
    state = {k: v.clone() for k, v in _SelfInitialised().state_dict().items()}
    with pytest.raises(RuntimeError, match="table"):
        build_with_weights(_SelfInitialised, state)


LOAD_EVERY_MODEL = """
import sys
from pathlib import Path
from job.render.rvc.checkpoint import build_synthesizer, read_checkpoint
from job.render.rvc.content import load_content_encoder
from job.render.rvc.rmvpe import RMVPE
from job.render.separate.loading import load_package
from shared.model_store import ModelStore

store = ModelStore(Path(sys.argv[1]))
load_package(next(store.separation_dir.glob("*.th")))
build_synthesizer(read_checkpoint(store.root / "voices" / "demo-voice" / "model.pth"))
RMVPE.load(store.pitch_model())
load_content_encoder(store.root / "base" / "hubert")
print("torch._dynamo" in sys.modules)
"""


def test_loading_every_model_leaves_torch_dynamo_unimported(store):
    """Built on the meta device, each network's initialisation ran torch's Python reference code,
    whose first use imports torch._dynamo (sympy and some 800 modules): 1.2 to 1.4 s of each
    process's start. Built unfilled, loading the separator, a voice, RMVPE and HuBERT imports none
    of it (a fresh process)."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", LOAD_EVERY_MODEL, str(store)], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "False", "loading a model imported torch._dynamo"


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
