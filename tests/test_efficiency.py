import pytest

from wattprint.profiler.core.efficiency import efficiency_class, thresholds
from wattprint.profiler.core.results import RequestResult


def test_classes_are_ordered_and_cover_everything():
    names = [n for n, _ in thresholds()]
    assert names == list("ABCDEFG")
    assert thresholds()[-1][1] == 0.0


@pytest.mark.parametrize("flops_per_j,expected", [(1.4e12, "A"), (2.3e11, "B"), (1.0e11, "C"), (3.5e10, "E"),
                                                  (1.0e10, "G"), (0.0, "G")])
def test_published_anchors_land_where_documented(flops_per_j, expected):
    assert efficiency_class(flops_per_j * 10.0, 10.0) == expected


def test_request_result_carries_its_class():
    r = RequestResult("r", 2.0, 1.0, 1.0, 0.1, 0, 0, 10, 5, 4.6e11, "science", "simulated")
    assert r.flops_per_j == pytest.approx(2.3e11) and r.efficiency_class == "B"
    zero = RequestResult("z", 0.0, 0.0, 0.0, 0.0, 0, 0, 1, 1, 1e9, None, "simulated")
    assert zero.efficiency_class is None
