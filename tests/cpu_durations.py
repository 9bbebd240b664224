"""``--cpu-durations=N``: the N tests that cost the most CPU time, beside pytest's ``--durations``.

The suite is CPU-bound on 2 cores (docs/development.md), so what a test costs the run is its CPU
time, not its wall time: a test that waits 15 s on a cut-off S3 server costs little, one that
renders a cover in a process of its own costs all of it. Each test's CPU time is taken from
``getrusage`` around its setup, call and teardown: its worker's own, and that of the child
processes reaped meanwhile (a process a fixture keeps for the whole session is counted where it
ends). Works under pytest-xdist: the numbers travel in the teardown report."""

from __future__ import annotations

import resource

import pytest

KEY = "cpu_s"
_START = pytest.StashKey[tuple[float, float]]()  # CPU times when the test's setup began
_SEEN: list[tuple[float, float, str]] = []  # (worker's, child processes', node id) per test


def _cpu() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-durations",
        type=int,
        default=0,
        metavar="N",
        help="show the N tests with the most CPU time (their worker's and their child processes')",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_START] = _cpu()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    if call.when == "teardown" and _START in item.stash:
        (own0, children0), (own1, children1) = item.stash[_START], _cpu()
        outcome.get_result().user_properties.append((KEY, (own1 - own0, children1 - children0)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":
        for key, value in report.user_properties:
            if key == KEY:
                _SEEN.append((value[0], value[1], report.nodeid))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    count = config.getoption("--cpu-durations")
    if not count or not _SEEN:
        return
    ranked = sorted(_SEEN, key=lambda seen: -(seen[0] + seen[1]))
    total = sum(own + children for own, children, _ in _SEEN)
    terminalreporter.write_sep("=", f"{count} most CPU-costly tests (of {total:.0f} CPU s in all)")
    for own, children, nodeid in ranked[:count]:
        terminalreporter.write_line(f"{own + children:7.1f}s  (worker {own:.1f}, processes {children:.1f})  {nodeid}")
