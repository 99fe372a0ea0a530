"""Eco-FL grouping and regrouping (docs/algorithms.md, "Eco-FL"): objective, local search, Algorithm 1."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttfl.fl.grouping import (
    DROPPED,
    ClientProfile,
    form_groups,
    group_stats,
    initial_groups,
    objective,
    regroup,
)


def profiles_from(latencies: dict[str, float], hists: dict[str, list[float] | None] | None = None):
    hists = hists or {}
    return [
        ClientProfile(c, lat, None if hists.get(c) is None else np.array(hists[c], float))
        for c, lat in latencies.items()
    ]


def relatency(profiles, **changes: float):
    return [ClientProfile(p.client, changes.get(p.client, p.latency_s), p.histogram) for p in profiles]


def _fleet(rows) -> list[ClientProfile]:
    return [ClientProfile(f"c{i}", x, None if h is None else np.array(h)) for i, (x, h) in enumerate(rows)]


fleets = st.lists(
    st.tuples(
        st.floats(min_value=0.05, max_value=50.0),
        st.one_of(st.none(), st.lists(st.integers(0, 30), min_size=4, max_size=4)),
    ),
    min_size=1,
    max_size=12,
).map(_fleet)


# ---------------------------------------------------------------------------------------------- objective


def test_objective_latency_term_is_the_squared_relative_deviation() -> None:
    profiles = profiles_from({"a": 1.0, "b": 3.0})
    # mean 2: ((1 − 2)/2)² + ((3 − 2)/2)² = 0.5
    assert objective({"a": 0, "b": 0}, profiles, 1) == pytest.approx(0.5)
    assert objective({"a": 0, "b": 1}, profiles, 2) == 0.0


def test_objective_label_term_is_l1_or_smoothed_kl_against_the_fleet() -> None:
    profiles = profiles_from({"a": 1.0, "b": 1.0}, {"a": [4, 0], "b": [0, 4]})
    assert objective({"a": 0, "b": 0}, profiles, 1) == pytest.approx(0.0)
    assert objective({"a": 0, "b": 1}, profiles, 2, lam=2.0) == pytest.approx(2.0 * (1.0 + 1.0))
    kl = objective({"a": 0, "b": 1}, profiles, 2, divergence="kl")
    assert np.isfinite(kl) and kl > 0


def test_objective_ignores_dropped_clients() -> None:
    profiles = profiles_from({"a": 1.0, "b": 1.0, "slow": 40.0})
    assert objective({"a": 0, "b": 0, "slow": DROPPED}, profiles, 1) == 0.0


# ---------------------------------------------------------------------------------------------- form_groups


@settings(max_examples=40, deadline=None)
@given(fleets, st.integers(1, 4))
def test_form_groups_places_every_client_once_without_empty_groups_and_never_worsens_the_start(
    profiles, num_groups
) -> None:
    assign = form_groups(profiles, num_groups)
    assert sorted(assign) == sorted(p.client for p in profiles)
    assert all(0 <= g < num_groups for g in assign.values())
    if len(profiles) >= num_groups:
        assert set(assign.values()) == set(range(num_groups))
    start = initial_groups(profiles, num_groups)
    assert objective(assign, profiles, num_groups) <= objective(start, profiles, num_groups) + 1e-9


def test_form_groups_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(3)
    profiles = [ClientProfile(f"c{i}", float(rng.uniform(0.1, 9)), rng.integers(0, 20, 5)) for i in range(15)]
    assert form_groups(profiles, 3, seed=7) == form_groups(list(reversed(profiles)), 3, seed=7)


def test_initial_split_is_contiguous_by_latency() -> None:
    profiles = profiles_from({"d": 4.0, "a": 1.0, "c": 3.0, "b": 2.0, "e": 5.0, "f": 6.0})
    assert initial_groups(profiles, 3) == {"a": 0, "b": 0, "c": 1, "d": 1, "e": 2, "f": 2}


def test_form_groups_with_one_group_puts_everyone_in_group_zero() -> None:
    profiles = profiles_from({"a": 0.1, "b": 7.0, "c": 30.0})
    assert form_groups(profiles, 1) == {"a": 0, "b": 0, "c": 0}


def test_label_term_pulls_label_skewed_clients_into_mixed_groups() -> None:
    latencies = {"a": 1.00, "b": 1.01, "c": 1.02, "d": 1.03}
    hists = {"a": [10, 0], "b": [10, 0], "c": [0, 10], "d": [0, 10]}
    profiles = profiles_from(latencies, hists)
    by_latency = form_groups(profiles, 2, lam=0.0)
    assert by_latency["a"] == by_latency["b"] != by_latency["c"] == by_latency["d"]
    mixed = form_groups(profiles, 2, lam=1.0)
    for g in (0, 1):
        classes = {int(np.argmax(hists[c])) for c, h in mixed.items() if h == g}
        assert classes == {0, 1}


def test_opted_out_clients_are_grouped_by_latency_only() -> None:
    latencies = {"a": 1.0, "b": 1.1, "c": 5.0, "d": 5.3, "e": 20.0, "f": 22.0, "private": 5.1}
    nobody_shares = profiles_from(latencies)
    assert form_groups(nobody_shares, 3, lam=10.0) == form_groups(nobody_shares, 3, lam=0.0)

    balanced = {c: [5, 5] for c in latencies if c != "private"}
    assign = form_groups(profiles_from(latencies, balanced), 3, lam=1.0)
    assert assign["private"] == assign["c"] == assign["d"]


def test_mismatched_histograms_are_refused() -> None:
    with pytest.raises(ValueError, match="one length"):
        form_groups(profiles_from({"a": 1.0, "b": 2.0}, {"a": [1, 2], "b": [1, 2, 3]}), 2)


# ---------------------------------------------------------------------------------------------- regroup

GROUPS = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 2, "f": 2}
LATENCIES = {"a": 1.0, "b": 1.1, "c": 5.0, "d": 5.5, "e": 50.0, "f": 55.0}


def test_group_stats_range_is_the_group_mean_latency() -> None:
    stats = group_stats(GROUPS, profiles_from(LATENCIES), 3)
    assert stats[1].latency == pytest.approx(5.25) and stats[1].range == pytest.approx(5.25)
    assert stats[1].fits(10.5) and not stats[1].fits(10.6)


def test_regroup_without_latency_changes_moves_nobody() -> None:
    assert regroup(GROUPS, profiles_from(LATENCIES), 3) == (GROUPS, {})


def test_a_client_whose_latency_jumps_moves_to_the_fitting_group_with_the_smallest_cost() -> None:
    profiles = relatency(profiles_from(LATENCIES), a=5.2)
    new, moves = regroup(GROUPS, profiles, 3)
    # g2 (mean 52.5) also admits 5.2 s, but costs far more than g1 (mean 5.25).
    assert new == {**GROUPS, "a": 1}
    assert moves == {"a": "g0->g1"}


def test_a_client_that_fits_nowhere_is_dropped_and_readmitted_when_it_fits_again() -> None:
    profiles = profiles_from({"a": 1.0, "b": 1.2, "c": 2.0, "d": 2.2})
    assign = {"a": 0, "b": 0, "c": 1, "d": 1}
    dropped, moves = regroup(assign, relatency(profiles, a=100.0), 2)
    assert dropped["a"] == DROPPED and moves == {"a": "g0->dropped"}
    still, moves = regroup(dropped, relatency(profiles, a=90.0), 2)
    assert still == dropped and moves == {}
    back, moves = regroup(dropped, relatency(profiles, a=1.1), 2)
    assert back == assign and moves == {"a": "dropped->g0"}


def test_regroup_admits_a_newcomer_into_a_fitting_group() -> None:
    profiles = profiles_from({**LATENCIES, "new": 52.0})
    new, moves = regroup(GROUPS, profiles, 3)
    assert new["new"] == 2 and moves == {"new": "new->g2"}


@settings(max_examples=40, deadline=None)
@given(fleets, st.integers(1, 3), st.lists(st.floats(0.01, 100.0), min_size=12, max_size=12))
def test_after_regroup_every_client_is_in_exactly_one_group_or_dropped(profiles, num_groups, new_lat) -> None:
    assign = form_groups(profiles, num_groups)
    moved = [ClientProfile(p.client, lat, p.histogram) for p, lat in zip(profiles, new_lat, strict=False)]
    new, moves = regroup(assign, moved, num_groups)
    assert sorted(new) == sorted(assign)
    assert all(g == DROPPED or 0 <= g < num_groups for g in new.values())
    assert set(moves) == {c for c in new if new[c] != assign[c]}
