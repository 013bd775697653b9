"""Shared fixtures. Run the suite with ``make test`` (or ``.venv/bin/pytest -q``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py, tests/reference.py

from tiny import make_tiny_model  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for the engine tests (cpu or cuda)")


@pytest.fixture(scope="session")
def device(request) -> str:
    return request.config.getoption("--device")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", tie=True)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2) -> Path:
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]
