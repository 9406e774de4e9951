from pathlib import Path

import pytest


@pytest.fixture
def reward_fns(monkeypatch):
    """Makes tests/unit/envs/reward_fns_for_tests.py importable by its module name."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return "reward_fns_for_tests"
