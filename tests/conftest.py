"""Session hooks: start the Triton interpreter suites early, so they run beside the other tests."""

from __future__ import annotations

import os

from miras_test_utils import start_interpreted_in_background, stop_interpreted


def pytest_collection_finish(session) -> None:
    if os.environ.get("TRITON_INTERPRET") or session.config.option.collectonly:
        return  # inside an interpreter subprocess, or only listing tests
    files = sorted({str(item.path) for item in session.items if item.name == "test_interpreted_suite"})
    if files:
        start_interpreted_in_background(files)


def pytest_sessionfinish(session, exitstatus) -> None:
    stop_interpreted()
