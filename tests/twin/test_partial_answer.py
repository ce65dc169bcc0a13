"""A desired write may ask for only part of the Twin back (`read_mask`)."""

from __future__ import annotations

import pytest
from pulse_client import AsyncPulseClient, InvalidArgument, struct_to_dict

from tests.twin.conftest import create_devices


async def test_a_write_answers_only_the_fields_asked_for(client: AsyncPulseClient) -> None:
    await create_devices(client, "P1")
    twin = await client.twin.update_desired(
        "P1", {"mode": "eco"}, expected_version=0, fields=["desired_version", "revision"]
    )
    assert [f.name for f, _ in twin.ListFields()] == ["desired_version", "revision"]
    assert twin.desired_version == 1 and twin.revision > 0

    patched = await client.twin.patch_desired(
        "P1", {"fan": 2}, expected_version=1, fields=["desired", "sync_status"]
    )
    assert struct_to_dict(patched.desired) == {"mode": "eco", "fan": 2}
    assert patched.device_id == "" and patched.desired_version == 0  # not asked for

    whole = await client.twin.get("P1")
    assert whole.desired_version == 2 and whole.device_id == "P1"
    assert patched.sync_status == whole.sync_status != whole.SYNC_STATUS_UNSPECIFIED


async def test_an_unknown_field_is_refused_before_anything_is_written(
    client: AsyncPulseClient,
) -> None:
    await create_devices(client, "P2")
    with pytest.raises(InvalidArgument) as caught:
        await client.twin.update_desired(
            "P2", {"mode": "eco"}, expected_version=0, fields=["desired_version", "colour"]
        )
    [violation] = caught.value.field_violations
    assert violation.field == "read_mask"
    assert "colour" in violation.description
    assert (await client.twin.get("P2")).desired_version == 0
