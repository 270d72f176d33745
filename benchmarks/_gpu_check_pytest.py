"""pytest plugin of `make gpu-check`: every test's outcome as one JSON line the moment it is known.

gpu_check runs `pytest -p _gpu_check_pytest` with GPU_CHECK_OUTCOMES naming the file. A JUnit
report is written only when pytest ends normally, so a run ended by the deadline (or a crash in a
CUDA kernel) would leave nothing; these lines are written and flushed one by one, each test's
start as well, so that the test that was running when the process died can be named.

Lines: {"test", "event": "start"}; {"test", "outcome" (passed|failed|skipped|error), "when"
(setup|call|teardown|collect), "seconds", "message"}.
"""
from __future__ import annotations

import json
import os

ENV = "GPU_CHECK_OUTCOMES"


def _write(record: dict) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _message(report) -> str:
    """One line saying why: the skip reason, the exception's own message, or the last line of a
    collection error."""
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:     # a skip: (file, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")[:300]
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and (getattr(crash, "message", None) or "").strip():
        return crash.message.strip().splitlines()[0][:300]
    lines = [line.strip() for line in str(longrepr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ")]
    return (errors or lines or [""])[-1].removeprefix("E ").strip()[:300]


def pytest_runtest_logstart(nodeid, location):
    _write({"test": nodeid, "event": "start"})


def pytest_runtest_logreport(report):
    failed_outside_call = report.when != "call" and report.failed
    skipped_at_setup = report.when == "setup" and report.skipped
    if report.when != "call" and not failed_outside_call and not skipped_at_setup:
        return
    outcome = "error" if failed_outside_call else report.outcome
    _write({"test": report.nodeid, "outcome": outcome, "when": report.when,
            "seconds": round(report.duration, 2), "message": _message(report)})


def pytest_collectreport(report):
    if report.failed:   # an import error in a test module: its tests never run
        _write({"test": report.nodeid or "<collection>", "outcome": "error", "when": "collect",
                "seconds": 0.0, "message": _message(report)})
