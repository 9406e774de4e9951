import pytest


@pytest.fixture(autouse=True)
def _ray(ray_session):
    """Every end-to-end test shares the session's Ray (the loops reuse a running one)."""
