from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttfl.wire import topics
from mqttfl.wire.topics import BINARY_KINDS, JSON_KINDS, KINDS, Topic, TopicError

ids = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,63}", fullmatch=True)
senders = ids.filter(lambda s: s != topics.BROADCAST)


@settings(max_examples=200, deadline=None)
@given(fleet=ids, kind=st.sampled_from(sorted(KINDS)), src=senders, dst=ids)
def test_built_topic_parses_back_to_its_parts(fleet: str, kind: str, src: str, dst: str) -> None:
    t = topics.topic(fleet, kind, src, dst)
    parsed = topics.parse(t)
    assert parsed == Topic(fleet, kind, src, dst)
    assert str(parsed) == t


def test_topic_layout_puts_kind_before_node_ids() -> None:
    assert topics.topic("default", "grad", "edge-1", "dev.7") == "mqttfl/v1/default/grad/edge-1/dev.7"


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "a+", "a#", "#", "+", "Dev1", "dev 1", "-dev", "_dev", ".dev", "dev\n", "a" * 65, "dé"],
)
def test_validate_id_rejects_ids_that_would_break_the_topic_tree(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.validate_id(bad)


def test_validate_id_accepts_64_characters_and_returns_the_id() -> None:
    assert topics.validate_id("a" * 64) == "a" * 64
    assert topics.validate_id("edge-2.site_a") == "edge-2.site_a"


def test_validate_id_rejects_non_strings() -> None:
    with pytest.raises(TopicError):
        topics.validate_id(7)  # type: ignore[arg-type]


def test_topic_refuses_unknown_kind() -> None:
    with pytest.raises(TopicError, match="unknown kind"):
        topics.topic("default", "gradient", "dev1", "edge1")


def test_topic_refuses_broadcast_as_sender_but_allows_it_as_destination() -> None:
    with pytest.raises(TopicError, match="reserved"):
        topics.topic("default", "model", "all", "dev1")
    assert topics.topic("default", "model", "cloud", "all").endswith("/cloud/all")


def test_topic_refuses_invalid_fleet_and_dst() -> None:
    with pytest.raises(TopicError):
        topics.topic("Fleet", "act", "dev1", "edge1")
    with pytest.raises(TopicError):
        topics.topic("default", "act", "dev1", "edge/1")


@pytest.mark.parametrize(
    "bad",
    [
        "mqttfl/v1/default/act/dev1",  # too few levels
        "mqttfl/v1/default/act/dev1/edge1/extra",  # too many
        "mqttfl/v2/default/act/dev1/edge1",  # wrong version
        "other/v1/default/act/dev1/edge1",  # wrong prefix
        "mqttfl/v1/default/bogus/dev1/edge1",  # unknown kind
        "mqttfl/v1/default/act/all/edge1",  # broadcast as sender
        "mqttfl/v1/default/act/Dev1/edge1",  # uppercase id
        "mqttfl/v1/default/act/dev1/",  # empty level
        "mqttfl/v1/+/act/dev1/edge1",  # wildcard is a filter, not a topic
        "",
    ],
)
def test_parse_rejects_topics_outside_the_tree(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(bad)


def test_parse_error_names_the_topic() -> None:
    with pytest.raises(TopicError, match="mqttfl/v1/default/bogus/dev1/edge1"):
        topics.parse("mqttfl/v1/default/bogus/dev1/edge1")


def test_filter_for_defaults_to_single_level_wildcards_on_six_levels() -> None:
    assert topics.filter_for() == "mqttfl/v1/+/+/+/+"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_filter_for_selects_one_kind(kind: str) -> None:
    f = topics.filter_for(kind=kind)
    assert f == f"mqttfl/v1/+/{kind}/+/+"
    assert len(f.split("/")) == 6


def test_filter_for_validates_non_wildcard_parts() -> None:
    with pytest.raises(TopicError):
        topics.filter_for(kind="nope")
    with pytest.raises(TopicError):
        topics.filter_for(dst="#")
    with pytest.raises(TopicError):
        topics.filter_for(src="a/b")
    with pytest.raises(TopicError):
        topics.filter_for(src="all")
    assert topics.filter_for("f1", "ctl", "ops", "dev1") == "mqttfl/v1/f1/ctl/ops/dev1"


def test_inbox_filters_cover_direct_and_broadcast_messages() -> None:
    assert topics.inbox_filters("default", "dev1") == [
        "mqttfl/v1/default/+/+/dev1",
        "mqttfl/v1/default/+/+/all",
    ]


def test_kind_sets_partition_all_kinds() -> None:
    assert JSON_KINDS | BINARY_KINDS == KINDS
    assert not JSON_KINDS & BINARY_KINDS
    assert {"act", "grad", "delta", "ckpt"} <= BINARY_KINDS
    assert "status" in JSON_KINDS
