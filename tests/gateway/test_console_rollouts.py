"""The console's rollouts: the new-rollout form on a group's page, the
rollouts page and a rollout's live progress view, in headless Chromium against
the real gateway, server and database (and, to see a rollout through, the
rollout engine, the evaluator and simulated devices over MQTT).

The first tests read the console's source and need no browser: every API
path it calls is one the gateway routes, and it never builds HTML from text.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pulse_client as pc
import pytest
from pulse.device.v1 import rollouts_pb2

from server.app import SERVICE_NAMES
from server.auth import Role
from server.gateway.routes import routes_for
from server.gateway.serve import services
from tests.conftest import Tenant
from tests.gateway.conftest import CHROMIUM, shot
from tests.helpers import eventually
from tests.rollouts.conftest import EngineFactory, start_engine  # noqa: F401
from tests.rollouts.helpers import simulated
from tests.twin.conftest import (  # noqa: F401
    EvaluatorFactory,
    create_devices,
    retained_cleanup,
    start_evaluator,
)

if CHROMIUM is not None:
    from playwright.async_api import Dialog, Page, Request, expect

CONSOLE = Path(__file__).resolve().parents[2] / "server" / "gateway" / "console"
State = rollouts_pb2.Rollout.State
browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)"
)

# call("VERB", "/path") or call("VERB", `/path/${id}:verb`): a path the
# console writes out (calls on a variable path are not read).
_CALL = re.compile(r"""\bcall\(\s*"([A-Z]+)",\s*(["`])(/[^"`]*)\2""")
_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")


def console_calls() -> set[tuple[str, str]]:
    """(method, path) of each API call in the console's source, with every
    ${...} of a template replaced by a sample value."""
    source = (CONSOLE / "app.js").read_text()
    return {(verb, _PLACEHOLDER.sub("some-id", path)) for verb, _, path in _CALL.findall(source)}


def test_every_path_the_console_calls_is_routed_and_it_calls_the_rollout_methods() -> None:
    routes = routes_for(services(SERVICE_NAMES))
    calls = console_calls()
    called: set[str] = set()
    unrouted = []
    for verb, path in sorted(calls):
        matched = [r for r in routes if r.http_method == verb and r.match(path) is not None]
        if not matched:
            unrouted.append(f"{verb} {path}")
        called.update(r.grpc_method for r in matched[:1])
    assert unrouted == []
    wanted = {
        f"/pulse.device.v1.RolloutService/{name}"
        for name in (
            "CreateRollout",
            "GetRollout",
            "ListRollouts",
            "ListRolloutDevices",
            "PauseRollout",
            "ResumeRollout",
            "CancelRollout",
        )
    }
    assert wanted <= {r.grpc_method for r in routes}
    assert wanted - called == set()
    # The target preview reads the group (its member count).
    assert "/pulse.device.v1.DeviceGroupService/GetGroup" in called


def test_the_console_never_builds_html_from_text() -> None:
    for name in ("app.js", "api.js"):
        source = (CONSOLE / name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
            assert sink not in source, f"{name} uses {sink}"


async def test_the_console_is_served_with_a_rollouts_entry(http: httpx.AsyncClient) -> None:
    index = await http.get("/")
    assert index.status_code == 200
    assert '<a href="#/rollouts" data-nav="rollouts">Rollouts</a>' in index.text
    app = await http.get("/app.js")
    assert app.status_code == 200
    assert "javascript" in app.headers["content-type"]
    assert app.text == (CONSOLE / "app.js").read_text()


def _base(page: Page) -> str:
    return page.url.split("#")[0]


async def _static_group(
    client: pc.AsyncPulseClient, group_id: str, name: str, ids: list[str]
) -> None:
    await client.groups.create_static(name, group_id=group_id)
    await client.groups.add_members(group_id, ids)


@browser
async def test_a_rollout_started_from_a_group_page_is_followed_live_to_its_end(
    page: Page,
    client: pc.AsyncPulseClient,
    tenant: Tenant,
    mqtt_url: str,
    start_evaluator: EvaluatorFactory,  # noqa: F811
    start_engine: EngineFactory,  # noqa: F811
) -> None:
    ids = ["FW-1", "FW-2", "FW-3"]
    await create_devices(client, *ids, "FW-OTHER")
    await _static_group(client, "boilers", "Boilers", ids)
    await page.goto(_base(page) + "#/groups/boilers")
    await expect(page.locator("#rollout-targets")).to_have_text("Targets 3 devices")
    group_rollouts = page.get_by_role("table", name="Rollouts of this group")
    await expect(group_rollouts).to_contain_text("No rollouts to this group yet")
    form = page.get_by_role("form", name="New rollout")
    start = form.get_by_role("button", name="Start rollout")
    patch = page.locator("#r-patch")

    # Checked in the page: nothing is sent that is not a JSON object.
    await patch.fill('{"fw": ')
    await start.click()
    await expect(page.locator("#r-patch-error")).to_contain_text("is not valid JSON")
    await expect(patch).to_have_attribute("aria-invalid", "true")
    await patch.fill('["fw", "2.0"]')
    await start.click()
    await expect(page.locator("#r-patch-error")).to_contain_text("must be a JSON object")
    assert [r async for r in client.rollouts.list()] == []

    # The server's field violations are shown beside their fields.
    await patch.fill('{"fw": "2.0"}')
    await page.get_by_label("Abort above % failed or timed out").fill("150")
    await page.get_by_label("Failure path (reported)").fill("firmware..error")
    await start.click()
    await expect(page.locator("#flash")).to_contain_text("HTTP 400")
    await expect(page.locator("#r-abort-percent-error")).to_have_text("must be from 0 to 100")
    await expect(page.locator("#r-failure-path-error")).to_contain_text("empty key")
    await expect(page.locator("#r-failure-path")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#r-patch-error")).to_be_hidden()
    await expect(patch).not_to_have_attribute("aria-invalid", "true")
    await shot(page, "rollout-form-errors")
    assert [r async for r in client.rollouts.list()] == []

    await page.get_by_label("Description").fill("Firmware 2.0")
    await page.get_by_label("Max devices per minute").fill("600")
    await page.get_by_label("Canary devices").fill("1")
    await page.get_by_label("Device timeout (seconds)").fill("30")
    await page.get_by_label("Abort above % failed or timed out").fill("50")
    await page.get_by_label("Minimum outcomes before aborting").fill("2")
    await page.get_by_label("Failure path (reported)").fill("firmware.error")
    await start.click()
    await expect(page).to_have_url(re.compile(r"#/rollouts/[0-9a-f-]{36}$"))
    rollout_id = page.url.rsplit("/", 1)[1]
    rollout = await client.rollouts.get(rollout_id)
    assert rollout.target_group_id == "boilers"
    assert pc.struct_to_dict(rollout.patch) == {"fw": "2.0"}
    assert rollout.strategy.max_per_minute == 600
    assert rollout.strategy.canary_count == 1
    assert rollout.strategy.device_timeout.seconds == 30
    assert rollout.HasField("abort_threshold_percent") and rollout.abort_threshold_percent == 50
    assert rollout.abort_min_count == 2
    assert rollout.failure_path == "firmware.error"
    assert rollout.description == "Firmware 2.0" and not rollout.continuous

    state = page.locator("#rollout-state")
    await expect(page.get_by_role("heading", name="Rollout: Firmware 2.0")).to_be_visible()
    await expect(state).to_contain_text("RUNNING")
    await expect(page.locator("#count-pending")).to_have_text("3")
    await expect(page.get_by_role("button", name="Pause")).to_be_visible()
    await expect(page.get_by_role("button", name="Cancel rollout")).to_be_visible()
    await expect(page.get_by_role("button", name="Resume")).to_be_hidden()
    await expect(page.get_by_role("link", name="Boilers")).to_be_visible()

    # Nothing runs it yet; now the engine does, and the open view follows.
    await start_evaluator()
    async with simulated(mqtt_url, tenant.tenant_id, ids, {"FW-3": "fail"}):
        await start_engine()
        await expect(state).to_contain_text("SUCCEEDED", timeout=30_000)
    await expect(state).to_contain_text("every device has an outcome")
    await expect(page.locator("#count-succeeded")).to_have_text("2")
    await expect(page.locator("#count-failed")).to_have_text("1")
    await expect(page.locator("#count-pending")).to_have_text("0")
    bar = page.locator("#rollout-progress")
    await expect(bar.locator(".seg")).to_have_count(2)
    await expect(bar.locator('.seg[data-state="SUCCEEDED"]')).to_have_attribute(
        "style", "width: 66.667%"
    )
    await expect(bar.locator('.seg[data-state="FAILED"]')).to_have_attribute(
        "style", "width: 33.333%"
    )
    for name in ("Pause", "Resume", "Cancel rollout"):
        await expect(page.get_by_role("button", name=name)).to_be_hidden()
    devices = page.locator("#rollout-devices")
    await expect(devices.locator("tr")).to_have_count(3)
    await expect(devices.locator('tr[data-device-id="FW-1"]')).to_contain_text("canary")
    await expect(devices.locator('tr[data-device-id="FW-2"]')).not_to_contain_text("canary")
    await shot(page, "rollout-progress")

    await page.get_by_label("Device state FAILED").check()
    await expect(devices.locator("tr")).to_have_count(1)
    await expect(devices.locator('tr[data-device-id="FW-3"]')).to_contain_text("FAILED")
    await expect(devices).to_contain_text("simulated failure")
    await page.get_by_label("Device state SUCCEEDED").check()
    await expect(devices.locator("tr")).to_have_count(3)
    await page.get_by_label("Device state FAILED").uncheck()
    await expect(devices.locator("tr")).to_have_count(2)
    await expect(devices.locator('tr[data-device-id="FW-3"]')).to_have_count(0)

    await page.get_by_role("link", name="Boilers").click()
    row = group_rollouts.locator(f'tr[data-rollout-id="{rollout_id}"]')
    await expect(row).to_contain_text("Firmware 2.0")
    await expect(row).to_contain_text("SUCCEEDED")
    await expect(row).to_contain_text("2 succeeded, 1 failed (of 3)")
    await shot(page, "group-rollouts")


@browser
async def test_pause_resume_and_cancel_follow_the_state_and_polling_ends_with_the_view(
    page: Page, client: pc.AsyncPulseClient
) -> None:
    await create_devices(client, *[f"Q-{n:02}" for n in range(25)])
    # No engine runs in this test: the rollout stays RUNNING with every device PENDING.
    rollout = await client.rollouts.create(filter={}, patch={"a": 1}, description="Quiet")
    rollout_id = rollout.rollout_id
    reads: list[str] = []

    def count_reads(request: Request) -> None:
        if request.method == "GET" and request.url.endswith(f"/customer/rollouts/{rollout_id}"):
            reads.append(request.url)

    page.on("request", count_reads)
    await page.goto(_base(page) + f"#/rollouts/{rollout_id}")
    state = page.locator("#rollout-state")
    await expect(state).to_contain_text("RUNNING")
    await expect(page.locator("#count-pending")).to_have_text("25")
    await expect(page.get_by_text("filter: every active device")).to_be_visible()

    # Keyset pages of 20, in device_id order.
    devices = page.locator("#rollout-devices")
    previous = page.get_by_role("button", name="Previous")
    following = page.get_by_role("button", name="Next")
    await expect(devices.locator("tr")).to_have_count(20)
    await expect(devices.locator("tr").first).to_contain_text("Q-00")
    await expect(previous).to_be_disabled()
    await following.click()
    await expect(devices.locator("tr")).to_have_count(5)
    await expect(devices.locator("tr").first).to_contain_text("Q-20")
    await expect(following).to_be_disabled()
    await previous.click()
    await expect(devices.locator("tr").first).to_contain_text("Q-00")
    await page.get_by_label("Device state SUCCEEDED").check()
    await expect(devices).to_contain_text("No devices in these states.")
    await page.get_by_label("Device state SUCCEEDED").uncheck()
    await expect(devices.locator("tr")).to_have_count(20)

    # A change made elsewhere shows up while the view is open.
    await client.rollouts.pause(rollout_id)
    await expect(state).to_contain_text("PAUSED", timeout=6_000)
    await expect(page.get_by_role("button", name="Resume")).to_be_visible()
    await expect(page.get_by_role("button", name="Pause")).to_be_hidden()

    await page.get_by_role("button", name="Resume").click()
    await expect(state).to_contain_text("RUNNING")
    await expect(page.locator("#flash")).to_contain_text("Rollout resumed")
    assert (await client.rollouts.get(rollout_id)).state == State.RUNNING
    await page.get_by_role("button", name="Pause").click()
    await expect(state).to_contain_text("PAUSED")
    assert (await client.rollouts.get(rollout_id)).state == State.PAUSED

    # Cancel asks first; saying no leaves it be.
    messages: list[str] = []

    async def dismiss(dialog: Dialog) -> None:
        messages.append(dialog.message)
        await dialog.dismiss()

    async def accept(dialog: Dialog) -> None:
        messages.append(dialog.message)
        await dialog.accept()

    page.once("dialog", dismiss)
    await page.get_by_role("button", name="Cancel rollout").click()
    await expect(page.get_by_role("button", name="Resume")).to_be_visible()
    assert messages and "Cancel rollout Quiet?" in messages[0]
    assert (await client.rollouts.get(rollout_id)).state == State.PAUSED
    page.once("dialog", accept)
    await page.get_by_role("button", name="Cancel rollout").click()
    await expect(state).to_contain_text("CANCELLED")
    for name in ("Pause", "Resume", "Cancel rollout"):
        await expect(page.get_by_role("button", name=name)).to_be_hidden()
    assert (await client.rollouts.get(rollout_id)).state == State.CANCELLED
    await shot(page, "rollout-cancelled")

    # A running rollout is polled every 2 s while its view is open, and no
    # more once the view is left.
    other = await client.rollouts.create(filter={}, patch={"b": 2})
    rollout_id = other.rollout_id
    reads.clear()
    await page.goto(_base(page) + f"#/rollouts/{rollout_id}")
    await expect(state).to_contain_text("RUNNING")
    await eventually(lambda: len(reads) >= 3, timeout=6, what="two polls after the first read")
    await page.get_by_role("link", name="Devices", exact=True).click()
    await expect(page.get_by_role("heading", name="Devices")).to_be_visible()
    await page.wait_for_timeout(300)  # a read already on its way when the view was left
    left_with = len(reads)
    await page.wait_for_timeout(4_500)
    assert len(reads) == left_with


@browser
async def test_a_viewer_is_refused_writes_as_elsewhere(
    page: Page, client: pc.AsyncPulseClient, tenant: Tenant
) -> None:
    await create_devices(client, "V-1", "V-2")
    await _static_group(client, "meters", "Meters", ["V-1", "V-2"])
    rollout = await client.rollouts.create(group_id="meters", patch={"a": 1})
    await page.goto(_base(page) + f"#token={tenant.token(Role.VIEWER)}")
    await expect(page).to_have_url(re.compile(r"#/devices$"))
    await page.goto(_base(page) + f"#/rollouts/{rollout.rollout_id}")
    state = page.locator("#rollout-state")
    await expect(state).to_contain_text("RUNNING")
    flash = page.locator("#flash")
    await page.get_by_role("button", name="Pause").click()
    await expect(flash).to_contain_text("needs the operator role")
    await expect(flash).to_contain_text("(HTTP 403)")
    await expect(state).to_contain_text("RUNNING")

    async def accept(dialog: Dialog) -> None:
        await dialog.accept()

    page.once("dialog", accept)
    await page.get_by_role("button", name="Cancel rollout").click()
    await expect(flash).to_contain_text("CancelRollout needs the operator role")
    assert (await client.rollouts.get(rollout.rollout_id)).state == State.RUNNING

    await page.goto(_base(page) + "#/groups/meters")
    await expect(page.locator("#rollout-targets")).to_have_text("Targets 2 devices")
    await page.locator("#r-patch").fill('{"a": 2}')
    await page.get_by_role("button", name="Start rollout").click()
    await expect(flash).to_contain_text("CreateRollout needs the operator role")
    await expect(page).to_have_url(re.compile(r"#/groups/meters$"))
    assert len([r async for r in client.rollouts.list()]) == 1


@browser
async def test_the_rollouts_page_lists_newest_first_with_state_target_and_counts(
    page: Page, client: pc.AsyncPulseClient
) -> None:
    await create_devices(client, "L-1", "L-2", "L-3")
    await _static_group(client, "lamps", "Lamps", ["L-1", "L-2"])
    first = await client.rollouts.create(
        group_id="lamps", patch={"on": True}, description="Lamps on"
    )
    await client.rollouts.cancel(first.rollout_id)
    # Text from the server is text, never markup.
    second = await client.rollouts.create(
        filter={"device_id_prefix": "L-"}, patch={"dim": 5}, description="<b>Dim</b> <img src=x>"
    )
    await page.get_by_role("link", name="Rollouts").click()
    await expect(page).to_have_url(re.compile(r"#/rollouts$"))
    await expect(page.get_by_role("link", name="Rollouts")).to_have_attribute(
        "aria-current", "page"
    )
    rows = page.locator("#rollouts tr")
    await expect(rows).to_have_count(2)
    newest, oldest = rows.nth(0), rows.nth(1)
    await expect(newest).to_have_attribute("data-rollout-id", second.rollout_id)
    await expect(newest).to_contain_text("<b>Dim</b> <img src=x>")
    await expect(page.locator("#rollouts b, #rollouts img")).to_have_count(0)
    await expect(newest).to_contain_text("RUNNING")
    await expect(newest).to_contain_text('filter: {"device_id_prefix":"L-"}')
    await expect(newest).to_contain_text("3 pending (of 3)")
    await expect(oldest).to_have_attribute("data-rollout-id", first.rollout_id)
    await expect(oldest).to_contain_text("CANCELLED")
    await expect(oldest.get_by_role("link", name="Lamps", exact=True)).to_have_attribute(
        "href", "#/groups/lamps"
    )
    await expect(oldest).to_contain_text("2 pending (of 2)")
    await expect(oldest.locator("td").last).not_to_have_text("never")
    await shot(page, "rollouts")
    await oldest.get_by_role("link", name="Lamps on").click()
    await expect(page.get_by_role("heading", name="Rollout: Lamps on")).to_be_visible()
    await expect(page.locator("#rollout-state")).to_contain_text("CANCELLED")
