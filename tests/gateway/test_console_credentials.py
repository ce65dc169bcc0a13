"""The console's credentials panel on a device's page, in headless Chromium
against the real gateway, server and database."""

from __future__ import annotations

import pulse_client as pc
import pytest

from server.broker_access.authenticator import Authenticator
from server.db import Database
from tests.conftest import Tenant
from tests.gateway.conftest import CHROMIUM, shot

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)"
)

if CHROMIUM is not None:
    from playwright.async_api import Dialog, Page, expect


async def test_a_credential_is_shown_once_listed_and_revoked(
    page: Page, client: pc.AsyncPulseClient, db: Database, tenant: Tenant
) -> None:
    await client.devices.create("METER-1", name="Meter")
    await page.goto(page.url.split("#")[0] + "#/devices/METER-1")
    await page.get_by_role("tab", name="Credentials").click()
    table = page.get_by_role("table", name="Credentials")
    await expect(table).to_contain_text("No credentials yet")

    await page.get_by_role("button", name="Create credential").click()
    issued = page.get_by_role("region", name="New credential")
    await expect(issued).to_contain_text("shown this once")
    username = await page.locator("#new-username").inner_text()
    secret = await page.locator("#new-secret").inner_text()
    client_id = f"{tenant.tenant_id}/METER-1"
    await expect(page.locator("#new-client-id")).to_have_text(client_id)
    example = page.locator("#new-example")
    await expect(example).to_contain_text("mosquitto_pub")
    await expect(example).to_contain_text(f"-u '{username}' -P '{secret}'")
    await expect(example).to_contain_text(f"-i '{client_id}'")
    await expect(example).to_contain_text(f"-t 'pulse/{client_id}/heartbeat'")
    # What the page shows is what a broker will accept.
    identity = await Authenticator(db).authenticate(username, secret, client_id)
    assert identity.username == username
    [credential] = await client.devices.list_credentials("METER-1")
    assert credential.username == username
    row = page.locator(f'tr[data-credential-id="{credential.credential_id}"]')
    await expect(row).to_contain_text("ACTIVE")
    await shot(page, "credential-created")

    await page.reload()
    await page.get_by_role("tab", name="Credentials").click()
    await expect(row).to_contain_text("ACTIVE")
    await expect(row).to_contain_text(username)
    await expect(page.locator("#new-secret")).to_have_count(0)
    assert secret not in await page.content()

    # A refusal is shown as every other error in the console.
    await client.devices.create_credential("METER-1")
    await page.get_by_role("button", name="Create credential").click()
    await expect(page.locator("#flash")).to_contain_text("already has 2 active credentials")
    await expect(page.locator("#new-secret")).to_have_count(0)

    async def accept(dialog: Dialog) -> None:
        await dialog.accept()

    page.once("dialog", accept)
    await row.get_by_role("button", name=f"Revoke {credential.credential_id}").click()
    await expect(row).to_contain_text("REVOKED")
    await expect(row.get_by_role("button")).to_have_count(0)
    await expect(page.locator("#flash")).to_contain_text(f"{credential.credential_id} revoked")
    await shot(page, "credential-revoked")
    revoked = {c.credential_id: c for c in await client.devices.list_credentials("METER-1")}
    assert revoked[credential.credential_id].HasField("revoke_time")
