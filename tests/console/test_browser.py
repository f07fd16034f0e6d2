"""The console in a real browser (Debian's chromium, driven by Playwright): log in,
open each page, change a budget, reset it, and keep a screenshot of every page."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from budgets import engine, services
from budgets.models import BudgetPeriod, BudgetPolicy, ScopeType
from budgets.money import Prices, usd_to_nanos
from spend.rollups import rollup_hours

from ..conftest import REQUIRE_SERVICES

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PASSWORD = "a-long-test-password-42"


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        message = "Debian's chromium is needed for the browser test (apt-get install chromium)"
        pytest.fail(message) if REQUIRE_SERVICES else pytest.skip(message)
    playwright_api = pytest.importorskip("playwright.sync_api")
    # Playwright's sync API runs an event loop in this thread; the ORM calls the test
    # makes between page actions are still plain synchronous calls.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        yield chromium
        chromium.close()
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.fixture
def seeded(transactional_db):
    get_user_model().objects.create_user("alice", password=PASSWORD, is_staff=True)
    acme = services.create_tenant("Acme", "cus_acme")
    globex = services.create_tenant("Globex", "cus_globex")
    for tenant, usd in ((acme, "10"), (globex, "20")):
        services.set_policy(tenant, ScopeType.TENANT, limit_nanos=usd_to_nanos(usd))
        agent = services.create_agent(tenant, "bot")
        scope = engine.state_of(tenant, agent)
        hold = engine.authorize(
            scope, request_id=f"seed-{tenant.pk}", model="mistral-small", prices=Prices(150, 600),
            input_tokens=20_000, max_output_tokens=5_000,
        )  # fmt: skip
        engine.capture(hold, prompt_tokens=18_000, completion_tokens=4_000)
    rollup_hours()
    return acme


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_an_operator_logs_in_changes_and_resets_a_budget(browser, live_server, seeded):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{live_server.url}/console/")
    assert "/admin/login/" in page.url
    page.fill("#id_username", "alice")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/console/")
    assert page.get_by_text("Tenants by state").is_visible()
    assert page.get_by_text("The upstream is simulated").is_visible()
    shot(page, "overview")

    page.get_by_role("link", name="Budgets").first.click()
    page.wait_for_url("**/console/budgets/")
    assert page.get_by_role("link", name="cus_acme").is_visible()
    assert page.get_by_role("link", name="cus_globex").is_visible()
    shot(page, "budgets")

    page.get_by_role("link", name="cus_acme").click()
    page.wait_for_url("**/console/budgets/tenant/cus_acme/")
    shot(page, "budget-detail")

    # A bad value is shown as an error and nothing is saved.
    page.fill("#policy-form input[name=soft_cap]", "0.95")
    page.fill("#policy-form input[name=hard_cap]", "0.9")
    page.click("#policy-form button[type=submit]")
    assert page.get_by_text("soft_cap must not exceed hard_cap").first.is_visible()
    shot(page, "budget-detail-error")
    policy = BudgetPolicy.objects.get(scope_key="cus_acme")
    assert policy.limit_nanos == usd_to_nanos("10")

    page.goto(f"{live_server.url}/console/budgets/tenant/cus_acme/")
    page.fill("#policy-form input[name=limit]", "25.5")
    page.click("#policy-form button[type=submit]")
    page.wait_for_load_state()
    policy.refresh_from_db()
    assert policy.limit_nanos == usd_to_nanos("25.5")
    assert page.locator("body").inner_text().count("25.5") >= 1

    page.fill("#reset-form input[name=reason]", "customer upgraded")
    page.check("#reset-form input[name=confirm]")
    page.click("#reset-form button[type=submit]")
    page.wait_for_load_state()
    closed = BudgetPeriod.objects.get(policy=policy, closed_at__isnull=False)
    assert closed.close_reason == "customer upgraded"
    assert closed.closed_by == "alice"
    assert page.get_by_text("customer upgraded").first.is_visible()
    shot(page, "budget-detail-after-reset")
    # The other tenant's budget is untouched.
    assert not BudgetPeriod.objects.filter(
        policy__scope_key="cus_globex", closed_at__isnull=False
    ).exists()
    page.close()
