"""A pytest plugin that writes each test's outcome as JSON (used by gpu_check.py).

    PYTHONPATH=benchmarks pytest -p pytest_outcomes --outcomes-json out.json tests/test_engine.py --device cuda

For every test: node id, outcome (passed / failed / skipped / error), seconds, and whether
it takes the ``device`` fixture of tests/conftest.py, i.e. whether ``--device cuda``
actually moves it to the GPU (tests without the fixture run on the CPU whatever
``--device`` says). Failures keep the last 1500 characters of their report. The file is
rewritten after every test (``"complete": false`` until pytest finishes), so a run killed
at its time limit still leaves the counts so far. Works under pytest-xdist (``-n N``): the
fixture flag travels in the report's ``user_properties``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

FLAG = "uses_device_fixture"


def pytest_addoption(parser):
    parser.addoption("--outcomes-json", default=None, help="write per-test outcomes to this JSON file")


def pytest_configure(config):
    path = config.getoption("--outcomes-json")
    if path and not hasattr(config, "workerinput"):  # the controller (or a plain run) writes the file
        config._outcomes = _Outcomes(Path(path))
        config.pluginmanager.register(config._outcomes, "outcomes_json")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Runs where the test runs (an xdist worker too): record whether it takes ``device``."""
    if not any(k == FLAG for k, _ in item.user_properties):
        item.user_properties.append((FLAG, "device" in getattr(item, "fixturenames", ())))


class _Outcomes:
    def __init__(self, path: Path):
        self.path = path
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        rec = self.tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed", "seconds": 0.0, "uses_device": False})
        rec["uses_device"] = rec["uses_device"] or any(k == FLAG and v for k, v in report.user_properties)
        rec["seconds"] = round(rec["seconds"] + report.duration, 3)
        if report.skipped and rec["outcome"] == "passed":
            rec["outcome"] = "skipped"
        elif report.failed:
            rec["outcome"] = "failed" if report.when == "call" else "error"
            rec["longrepr"] = str(report.longrepr)[-1500:]
        if report.when == "teardown":
            self.write(complete=False)

    def pytest_sessionfinish(self, session, exitstatus):
        self.write(complete=True, exitstatus=int(exitstatus))

    def write(self, complete: bool, exitstatus: int | None = None) -> None:
        counts: dict[str, int] = {}
        for rec in self.tests.values():
            counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
        on_device = [r for r in self.tests.values() if r["uses_device"]]
        doc = {"complete": complete, "exitstatus": exitstatus, "counts": counts, "total": len(self.tests),
               "device_fixture_tests": len(on_device),
               "device_fixture_counts": {k: sum(r["outcome"] == k for r in on_device) for k in counts},
               "tests": list(self.tests.values())}
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, self.path)
