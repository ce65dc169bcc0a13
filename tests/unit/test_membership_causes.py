"""Which change a membership event names (server/groups/causes.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server import filters
from server.groups import causes

changes = st.sets(st.sampled_from(causes.PRIORITY), min_size=1)
sensitivities = st.sets(st.sampled_from(causes.PRIORITY)).map(frozenset)


@given(changes, sensitivities)
def test_the_named_change_is_one_that_happened(
    happened: set[str], sensitive: frozenset[str]
) -> None:
    named = causes.cause(happened, sensitive)
    assert named in happened
    visible = happened & sensitive
    if visible:
        # The most telling of those the group can see.
        assert named == min(visible, key=causes.PRIORITY.index)
    else:
        assert named == min(happened, key=causes.PRIORITY.index)


def test_no_change_is_a_bug() -> None:
    with pytest.raises(ValueError, match="no change"):
        causes.cause([], frozenset())


def test_what_a_group_is_sensitive_to() -> None:
    static = causes.sensitive_to(None)
    assert static == {causes.DEVICE_DELETED, causes.DEVICE_CREATED, causes.GROUP_EDIT}

    tags_only = causes.sensitive_to(filters.parse_filter({"tags": ["prod"]}))
    assert causes.TAGS in tags_only and causes.DEVICE_DECOMMISSIONED in tags_only
    assert causes.TWIN not in tags_only and causes.STATUS not in tags_only

    sync = causes.sensitive_to(filters.parse_filter({"sync_statuses": ["STALE"]}))
    # Sync status depends on connectivity, the twin and the time.
    assert {causes.STATUS, causes.TWIN, causes.SYNC_TIMEOUT} <= sync

    since = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
    seen = filters.parse_filter({"last_seen_after": since, "include_decommissioned": True})
    assert causes.LAST_SEEN in causes.sensitive_to(seen)
    assert causes.DEVICE_DECOMMISSIONED not in causes.sensitive_to(seen)


def test_a_device_tagged_and_reported_together_leaves_a_tag_group_because_of_its_tags() -> None:
    group = causes.sensitive_to(filters.parse_filter({"tags": ["prod"]}))
    assert causes.cause({causes.TWIN, causes.TAGS}, group) == causes.TAGS
    configured = causes.sensitive_to(
        filters.parse_filter(
            {"twin_conditions": [{"document": "DESIRED", "path": "mode", "operator": "EXISTS"}]}
        )
    )
    # Created and configured in one evaluation: it entered because of its twin.
    assert causes.cause({causes.DEVICE_CREATED, causes.TWIN}, configured) == causes.TWIN
