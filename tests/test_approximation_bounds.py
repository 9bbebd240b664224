"""The bounds an approximate path's output is held to against the exact path's, as the quality
stage scores both (``bench.measures``: the bf16 and int8 conversion tests and
``bench.approximations`` use them): each bound fails when its measure is off, on the real quality
models (CREPE, the speaker encoder, DNSMOS)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.measures import MAX_DNSMOS_SHIFT, MIN_MELODY_SPREAD_CENTS, QualityView, quality_against_exact
from job.render.quality.meter import QualityMeter
from tests.conftest import sung_tone

WITHIN = QualityView(f0_corr=0.9999, f0_rmse=0.3, f0_spread=12.0, speaker_drop=0.0001, dnsmos_shift=0.01)


@pytest.fixture(scope="module")
def meter() -> QualityMeter:
    return QualityMeter()


@pytest.mark.parametrize(
    ("change", "outside"),
    [
        ({}, []),
        ({"f0_corr": 0.94}, ["f0_corr"]),
        ({"f0_corr": 0.94, "f0_spread": 2.9}, []),  # a steady buzz: its correlation is the tracker's jitter
        ({"f0_rmse": 12.0}, ["f0_rmse"]),
        ({"speaker_drop": 0.02}, ["speaker"]),
        ({"dnsmos_shift": 0.2}, ["dnsmos"]),
        ({"dnsmos_shift": None, "f0_corr": None}, ["f0_corr", "dnsmos"]),  # not measured is not within
    ],
)
def test_each_bound_names_the_measure_outside_it(change, outside):
    assert WITHIN.model_copy(update=change).outside() == outside


def test_the_exact_output_against_itself_is_within_and_white_noise_14_db_below_it_is_not(meter):
    exact = sung_tone(6.0, 220.0, vibrato=0.01)
    same = quality_against_exact(meter, exact, exact.copy(), 16000)
    assert same.outside() == []
    assert same.dnsmos_shift == 0.0 and same.f0_rmse is not None and same.f0_rmse < 0.5
    # the vibrato (measured 10.4 cents of spread): the correlation is held to its bound
    assert same.f0_spread is not None and same.f0_spread > MIN_MELODY_SPREAD_CENTS

    rng = np.random.default_rng(0)
    noise = rng.standard_normal(len(exact)).astype(np.float32) * np.sqrt(np.mean(exact**2)) * 0.2
    noisy = quality_against_exact(meter, exact, exact + noise, 16000)
    # measured 0.47 to 0.63 over four noise seeds (20 dB below: 0.14 to 0.33; 30 dB: 0.12 to 0.34)
    print(f"white noise 14 dB below: DNSMOS shift {noisy.dnsmos_shift}")
    assert noisy.dnsmos_shift is not None and noisy.dnsmos_shift > MAX_DNSMOS_SHIFT
    assert "dnsmos" in noisy.outside()


def test_a_melody_sung_a_fifth_of_a_semitone_off_is_outside(meter):
    exact = sung_tone(6.0, 220.0, vibrato=0.01)
    sharp = sung_tone(6.0, 220.0 * 2 ** (20 / 1200), vibrato=0.01)  # 20 cents sharp throughout
    view = quality_against_exact(meter, exact, sharp, 16000)
    print(f"20 cents sharp: F0 RMSE {view.f0_rmse}")
    assert view.f0_rmse is not None and 15 < view.f0_rmse < 25
    assert "f0_rmse" in view.outside()
