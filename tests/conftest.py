import pytest

from wattprint.configs import config_dir
from wattprint.profiler.core.costmodel import geometry_from_config
from wattprint.profiler.core.hardware import load_profile


@pytest.fixture(scope="session")
def llama8b():
    return geometry_from_config(config_dir() / "models" / "llama-3.1-8b.json")


@pytest.fixture(scope="session")
def h100():
    return load_profile("h100-sxm")
