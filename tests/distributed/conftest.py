"""A 2-process gloo pool shared by the tests of one module (spawning ranks costs seconds)."""
import pytest

from ._pool import DistPool


@pytest.fixture(scope="module")
def pool():
    p = DistPool(2)
    yield p
    p.close()
