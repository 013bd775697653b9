"""A pytest plugin that writes each test's outcome as JSON (used by gpu_check.py).

    PYTHONPATH=benchmarks pytest -p pytest_outcomes --outcomes-json out.json tests/test_engine.py --device cuda

For every test: node id, outcome (passed / failed / skipped / error), seconds, and whether
it takes the ``device`` fixture of tests/conftest.py, i.e. whether ``--device cuda``
actually moves it to the GPU (tests without the fixture run on the CPU whatever
``--device`` says). Failures keep the last 1500 characters of their report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def pytest_addoption(parser):
    parser.addoption("--outcomes-json", default=None, help="write per-test outcomes to this JSON file")


def pytest_configure(config):
    path = config.getoption("--outcomes-json")
    if path:
        config._outcomes = _Outcomes(Path(path))
        config.pluginmanager.register(config._outcomes, "outcomes_json")


class _Outcomes:
    def __init__(self, path: Path):
        self.path = path
        self.tests: dict[str, dict] = {}
        self.uses_device: dict[str, bool] = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            self.uses_device[item.nodeid] = "device" in getattr(item, "fixturenames", ())

    def pytest_runtest_logreport(self, report):
        rec = self.tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed", "seconds": 0.0,
                                                    "uses_device": self.uses_device.get(report.nodeid, False)})
        rec["seconds"] = round(rec["seconds"] + report.duration, 3)
        if report.skipped and rec["outcome"] == "passed":
            rec["outcome"] = "skipped"
        elif report.failed:
            rec["outcome"] = "failed" if report.when == "call" else "error"
            rec["longrepr"] = str(report.longrepr)[-1500:]

    def pytest_sessionfinish(self, session, exitstatus):
        counts: dict[str, int] = {}
        for rec in self.tests.values():
            counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
        on_device = [r for r in self.tests.values() if r["uses_device"]]
        doc = {"exitstatus": int(exitstatus), "counts": counts, "total": len(self.tests),
               "device_fixture_tests": len(on_device),
               "device_fixture_counts": {k: sum(r["outcome"] == k for r in on_device) for k in counts},
               "tests": list(self.tests.values())}
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, self.path)
