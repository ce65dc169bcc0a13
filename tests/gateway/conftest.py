"""The gateway in front of the test server, an HTTP client for it, and a
headless Chromium on the console (where Debian's chromium is installed)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.app import SERVICE_NAMES
from server.gateway.serve import running_gateway
from tests.conftest import Tenant

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts" / "console"

if CHROMIUM is not None:
    from playwright.async_api import Browser, Page, async_playwright


@pytest.fixture(scope="session")
async def gateway_url(target: str) -> AsyncIterator[str]:
    async with running_gateway(
        target,
        SERVICE_NAMES,
        host="127.0.0.1",
        port=0,
        cors_origins=("http://console.example",),
        max_body_bytes=64 * 1024,
    ) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
async def http(gateway_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as client:
        yield client


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        await b.close()


@pytest.fixture
async def page(browser: Browser, gateway_url: str, tenant: Tenant) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    p = await context.new_page()
    await p.goto(f"{gateway_url}/#token={tenant.token()}")
    yield p
    await context.close()


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
