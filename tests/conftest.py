"""Shared fixtures: the tiny model is built once per session, offline, and loaded by path."""

from __future__ import annotations

import pytest

from posttrain.demo.tiny_model import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", size="test")
