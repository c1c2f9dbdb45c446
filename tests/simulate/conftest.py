import pytest

from sim_standins import StandInEstimator, make_slab


@pytest.fixture
def slab():
    return make_slab()


@pytest.fixture
def estimator():
    return StandInEstimator()
