"""bench.targets' verdicts: each target's measured value from the run's rows, the class's limits,
and a target whose rows failed read as not measured, never as met (the timing itself is the
benchmark's, never a test's)."""

from bench.targets import CLI, FIRST, LONG, PASSES, PLAIN, SECOND, stage_peak, verdicts


def _cover(wall: float, seconds: int, peaks: dict[str, int]) -> dict:
    return {"wall": wall, "audio_s": seconds, "rss_mb": 4999.0, "stage_peaks_mb": peaks}


ROWS = {
    CLI: {"wall": 138.5, "audio_s": 210, "rss_mb": 1751.0},
    FIRST: _cover(192.5, 210, {"other": 1500, "separate": 1239, "convert": 1797, "mix": 1637}),
    SECOND: _cover(90.4, 210, {"convert": 1508}),
    PLAIN: _cover(60.0, 60, {"convert": 1600}),
    PASSES: _cover(104.0, 60, {"separate": 1811}),
    LONG: _cover(599.4, 600, {"other": 4999, "separate": 1291, "convert": 1965, "quality": 1860}),
}


def _by_target(bf16: bool, rows: dict[str, dict] = ROWS) -> dict[str, tuple[float | None, float, bool | None]]:
    return {v.target: (v.measured, v.limit, v.met) for v in verdicts(rows, bf16)}


def test_each_target_is_its_rows_ratio_against_the_class_limit():
    got = list(_by_target(bf16=True).values())
    cli, song, second, peak, flat, passes, approximations = got
    assert cli[0] == 192.5 / 138.5 and cli[1:] == (0.8, False)
    assert song[0] == 192.5 / 210 and song[1:] == (0.30, False)
    assert second[0] == 90.4 / 210 and second[1:] == (0.15, False)
    # the stages' peak, not the process's before the clock (the demo song's generation: 4999 MB)
    assert peak == (1965.0, 2560.0, True)
    assert flat[0] == 1965 / 1797 and flat[2] is True
    assert passes[0] == 104.0 / 60.0 and passes[1:] == (1.3, False)
    assert approximations == (None, 0, None)  # bench.approximations did not run


def test_the_default_paths_cover_is_met_only_with_no_measure_outside_its_bounds():
    def approximations(outside: list[str] | None):
        return verdicts(ROWS, bf16=True, outside=outside)[-1]

    assert approximations([]).met is True and approximations([]).cells()[1] == "0 outside"
    outside = approximations(["dnsmos"])
    assert outside.met is False and outside.cells()[1] == "1 outside" and "dnsmos" in outside.target
    assert approximations(None).met is None and "not measured" in approximations(None).cells()


def test_a_cpu_without_native_bf16_takes_the_avx2_limits():
    song, second = list(_by_target(bf16=False).values())[1:3]
    assert (song[1], second[1]) == (1.0, 0.5)
    assert (song[2], second[2]) == (True, True)


def test_a_target_whose_row_failed_is_not_measured_and_never_met():
    rows = {k: v for k, v in ROWS.items() if k not in (CLI, LONG)}
    got = verdicts(rows, bf16=True)
    unmeasured = [v for v in got if v.measured is None]
    # the CLI ratio, the peak, flatness; and the approximations' cover, not run here
    assert [v.met for v in unmeasured] == [None, None, None, None]
    assert all("not measured" in v.cells() and "met" not in v.cells() for v in unmeasured)
    assert [v.met for v in got if v.measured is not None] == [False, False, False]


def test_a_row_without_stage_peaks_falls_back_to_the_process_peak():
    assert stage_peak({"rss_mb": 1751.0}) == 1751.0
    assert stage_peak(ROWS[FIRST]) == 1797.0
