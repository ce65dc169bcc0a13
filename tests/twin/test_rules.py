"""The pure twin rules: sync status, document checks, notification payloads."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from server import config, validation
from server.errors import FieldViolation
from server.listener import GAP
from server.twin import documents, notify
from server.twin.sync import SyncStatus, sync_status
from server.twin.watch import _changed

NOW = datetime(2030, 1, 1, tzinfo=UTC)
LIMIT = timedelta(seconds=300)


@pytest.mark.parametrize(
    ("desired_v", "reported_v", "in_sync", "status", "age_s", "expected"),
    [
        (3, 3, True, "ONLINE", 10, SyncStatus.SYNCED),
        (3, 3, True, "OFFLINE", 9999, SyncStatus.SYNCED),  # the last report still holds
        (3, 2, True, "ONLINE", 10, SyncStatus.PENDING),  # equal values, not acknowledged
        (3, 3, False, "ONLINE", 10, SyncStatus.PENDING),  # acknowledged, other values
        (3, 2, False, "ONLINE", 301, SyncStatus.STALE),  # behind for too long
        (3, 2, False, "ONLINE", 300, SyncStatus.PENDING),
        (3, 2, False, "STALE", 1, SyncStatus.STALE),
        (3, 2, False, "OFFLINE", 1, SyncStatus.STALE),
        (3, 2, False, "UNKNOWN", 1, SyncStatus.STALE),
    ],
)
def test_sync_status(
    desired_v: int, reported_v: int, in_sync: bool, status: str, age_s: int, expected: SyncStatus
) -> None:
    assert (
        sync_status(
            desired_version=desired_v,
            reported_version=reported_v,
            in_sync=in_sync,
            connectivity=status,
            desired_updated_at=NOW - timedelta(seconds=age_s),
            reported_updated_at=None,
            now=NOW,
            stale_after=LIMIT,
        )
        is expected
    )


def test_a_twin_never_written_ages_from_its_last_report() -> None:
    def status(reported_age_s: int | None) -> SyncStatus:
        return sync_status(
            desired_version=0,
            reported_version=0,
            in_sync=False,
            connectivity="ONLINE",
            desired_updated_at=None,
            reported_updated_at=None
            if reported_age_s is None
            else NOW - timedelta(seconds=reported_age_s),
            now=NOW,
            stale_after=LIMIT,
        )

    assert status(None) is SyncStatus.PENDING
    assert status(10) is SyncStatus.PENDING
    assert status(400) is SyncStatus.STALE


def test_the_stale_thresholds_are_configurable_and_distinct() -> None:
    base = {"PULSE_SECRET": "x" * 32}
    defaults = config.load(base)
    assert (defaults.twin_stale_after_s, defaults.liveness_stale_after_s) == (300, 30)
    assert config.load({**base, "PULSE_TWIN_STALE_AFTER_S": "2.5"}).twin_stale_after_s == 2.5
    # The liveness setting's earlier name still works; the new one wins.
    assert config.load({**base, "PULSE_STALE_AFTER_S": "7"}).liveness_stale_after_s == 7
    both = {**base, "PULSE_STALE_AFTER_S": "7", "PULSE_LIVENESS_STALE_AFTER_S": "9"}
    assert config.load(both).liveness_stale_after_s == 9
    with pytest.raises(ValueError, match="PULSE_TWIN_STALE_AFTER_S must be positive"):
        config.load({**base, "PULSE_TWIN_STALE_AFTER_S": "0"})


def _nested(depth: int, leaf: Any = 1) -> Any:
    doc = leaf
    for _ in range(depth):
        doc = {"k": doc}
    return doc


@pytest.mark.parametrize(
    "doc",
    [
        _nested(10),
        _nested(11),
        _nested(10, leaf={}),
        _nested(9, leaf=[[1]]),
        {"a": "x" * (32 * 1024 - 8)},
        {"a": "x" * (32 * 1024 - 7)},
        {"é": "ü" * 5000},  # escaped as \\u00fc: six bytes each
        {"a": "b\x00"},
        {"a": [1.5, float("nan")]},
        {"a": {"b\ud800": 1}},
        {},
    ],
)
def test_the_ingest_check_agrees_with_the_api_check(doc: dict[str, Any]) -> None:
    """MQTT reports and gRPC writes accept exactly the same documents, and
    the size and depth limits are check_document's."""
    violations: list[FieldViolation] = []
    documents.check("doc", doc, violations)
    text, problem = documents.inspect(doc)
    assert (problem is None) == (not violations)
    if problem is None:
        assert text is not None and json.loads(text) == doc
    else:
        assert problem[1] == violations[0].description
    plain: list[FieldViolation] = []
    validation.check_document("doc", doc, documents.MAX_BYTES, plain)
    if plain:
        assert violations == plain


def test_notification_payloads_stay_under_the_limit() -> None:
    items = [f"DEVICE-{n:06d}:{n}" for n in range(2000)]
    payloads = notify.payloads(items)
    assert len(payloads) > 1
    assert all(len(p) <= 7000 for p in payloads)
    assert ",".join(payloads).split(",") == items
    assert notify.payloads([]) == []


def test_watchers_read_device_ids_with_colons() -> None:
    sent = {"a:b": 4, "c": 1}
    assert _changed(["a:b:5,c:1,x:9"], {"a:b", "c"}, sent) == {"a:b"}
    assert _changed(["a:b:4"], {"a:b"}, sent) == set()
    assert _changed(["c:2", GAP], {"c"}, sent) is None
