"""FedAsync staleness functions (arXiv 1903.03934), properties from docs/algorithms.md, "Asynchronous aggregation"."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqttfl.fl.staleness import by_name, constant, hinge, polynomial


@pytest.mark.parametrize("make", [constant, polynomial, hinge])
def test_a_fresh_update_is_not_damped(make) -> None:
    assert make()(0) == 1.0


def test_polynomial_halves_at_staleness_three() -> None:
    assert polynomial()(3) == pytest.approx(0.5)


def test_hinge_tolerates_b_versions_then_decays() -> None:
    s = hinge()
    assert s(4) == 1.0
    assert s(5) == pytest.approx(1 / 11)


def test_fedbuff_default_is_inverse_square_root() -> None:
    assert polynomial(0.5)(8) == pytest.approx(1 / math.sqrt(9))


@given(st.integers(min_value=0, max_value=10_000))
def test_staleness_factors_lie_in_unit_interval_and_never_grow(t: int) -> None:
    for s in (constant(), polynomial(), hinge()):
        assert 0.0 < s(t + 1) <= s(t) <= 1.0


def test_negative_staleness_is_refused() -> None:
    with pytest.raises(ValueError):
        polynomial()(-1)


def test_by_name_builds_with_parameters_and_rejects_unknown_names() -> None:
    assert by_name("hinge", a=1.0, b=0)(1) == pytest.approx(0.5)
    assert by_name("constant")(100) == 1.0
    with pytest.raises(ValueError, match="unknown staleness"):
        by_name("exponential")
