"""The console in a real browser (Debian's chromium, driven by Playwright): log in,
open each page, change a budget, reset it, and keep a screenshot of every page."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import OperationalError, connections, transaction

from budgets import engine, services
from budgets.models import BudgetPeriod, BudgetPolicy, ScopeType, Tenant
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
        # With Playwright's loop running in this thread, Django keeps this thread's
        # connections per context (asgiref's Local): the ones the test opened between
        # page actions are not the thread's usual one, and would stay open.
        connections.close_all()
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


def log_in(page, url: str) -> None:
    page.goto(url)
    page.fill("#id_username", "alice")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(url)


def spend_more(tenant_key: str, prompt_tokens: int) -> None:
    """A captured call of `prompt_tokens` at USD 0.15 per million, rolled up."""
    tenant = Tenant.objects.get(stripe_customer_id=tenant_key)
    agent = tenant.agents.get(name="bot")
    for attempt in range(20):
        try:
            with transaction.atomic():
                hold = engine.authorize(
                    engine.state_of(tenant, agent), request_id=f"more-{prompt_tokens}",
                    model="mistral-small", prices=Prices(150, 600), input_tokens=prompt_tokens,
                    max_output_tokens=1,
                )  # fmt: skip
                engine.capture(hold, prompt_tokens=prompt_tokens, completion_tokens=0)
                rollup_hours()
            return
        except OperationalError:
            # SQLite's shared in-memory test database locks a table the live server is
            # reading (the page polls every second); try again.
            if attempt == 19:
                raise
            time.sleep(0.1)


def chart_drawn(page, canvas_id: str) -> dict:
    """The Chart.js chart on a canvas (waits for it): its labels and datasets."""
    page.wait_for_function(
        f"() => {{ const chart = window.Chart && Chart.getChart("
        f"document.getElementById('{canvas_id}'));"
        " return chart && !Chart.animator.running(chart); }"
    )
    return page.evaluate(
        f"""() => {{
            const chart = Chart.getChart(document.getElementById('{canvas_id}'));
            return {{labels: chart.data.labels,
                     datasets: chart.data.datasets.map(d => ({{label: d.label, usd: d.usd}})),
                     width: chart.width, height: chart.height}};
        }}"""
    )


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


def test_pages_draw_charts_and_refresh_their_numbers_live(browser, live_server, seeded, settings):
    settings.CONSOLE_REFRESH_SECONDS = 1
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []  # exceptions in the page's JavaScript (Chart.js, htmx, console.js)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    log_in(page, f"{live_server.url}/console/spend/")
    assert page.get_by_role("link", name="Spend").first.get_attribute("aria-current") == "page"

    # The spend page: a Chart.js chart drawn from the page's JSON, per hour, by model.
    chart = chart_drawn(page, "spend-chart")
    assert len(chart["labels"]) == 24
    assert [d["label"] for d in chart["datasets"]] == ["mistral-small"]
    assert chart["datasets"][0]["usd"][-1] == "0.0102"  # two calls of USD 0.0051
    assert chart["width"] > 600 and chart["height"] > 200
    assert page.locator("#spend-total").inner_text() == "USD 0.0102"
    shot(page, "spend")

    # htmx fetches the fragment again, and new spend shows without a reload.
    page.evaluate("() => { window.notReloaded = true; }")
    with page.expect_request("**/console/fragments/spend/**"):
        pass
    spend_more("cus_acme", 10_000)  # USD 0.0015
    page.wait_for_function(
        "() => document.getElementById('spend-total').textContent === 'USD 0.0117'", timeout=10_000
    )
    page.wait_for_function(
        "() => Chart.getChart(document.getElementById('spend-chart')).data.datasets[0]"
        ".usd.at(-1) === '0.0117'",
        timeout=10_000,
    )
    assert page.evaluate("() => window.notReloaded") is True
    assert "0.0066" in page.locator("#by-tenant").inner_text()  # Acme: 0.0051 + 0.0015

    # A range that cannot be shown: a clear message, and nothing polls.
    page.fill("#from", "2026-11-20")
    page.fill("#to", "2026-11-10")
    page.click("#spend-form button[type=submit]")
    page.wait_for_load_state()
    assert "after the to date" in page.locator("#spend-error").inner_text()
    assert page.locator("[hx-get]").count() == 0
    shot(page, "spend-error")

    # The other pages: charts drawn, numbers refreshed in place, a screenshot of each.
    page.goto(f"{live_server.url}/console/")
    chart = chart_drawn(page, "overview-chart")
    assert len(chart["labels"]) == 24
    page.evaluate("() => { window.notReloaded = true; }")
    spend_more("cus_globex", 20_000)  # USD 0.003
    page.wait_for_function(
        "() => document.getElementById('spend-today').textContent === 'USD 0.0147'",
        timeout=10_000,
    )
    assert page.evaluate("() => window.notReloaded") is True
    shot(page, "overview")

    page.goto(f"{live_server.url}/console/budgets/")
    with page.expect_request("**/console/fragments/budgets/**"):
        pass
    shot(page, "budgets")

    page.goto(f"{live_server.url}/console/budgets/tenant/cus_acme/")
    chart = chart_drawn(page, "budget-chart")
    assert len(chart["labels"]) == 24
    # A form being filled in survives the refreshes around it.
    page.fill("#reset-form input[name=reason]", "half-typed")
    with page.expect_request("**/console/fragments/budgets/tenant/cus_acme/**"):
        pass
    page.wait_for_timeout(300)
    assert page.input_value("#reset-form input[name=reason]") == "half-typed"
    shot(page, "budget-detail-chart")

    page.goto(f"{live_server.url}/console/agents/")
    agent = Tenant.objects.get(stripe_customer_id="cus_acme").agents.get(name="bot")
    cell = page.locator(f"#agent-{agent.pk} [data-col=spend-today]")
    before = cell.inner_text()
    page.fill(f"#reason-{agent.pk}", "typing")
    spend_more("cus_acme", 30_000)  # USD 0.0045
    page.wait_for_function(
        f"() => document.querySelector('#agent-{agent.pk} [data-col=spend-today]')"
        f".textContent.trim() !== '{before}'",
        timeout=10_000,
    )
    assert cell.inner_text() == "0.0111"  # 0.0051 + 0.0015 + 0.0045
    assert page.input_value(f"#reason-{agent.pk}") == "typing"
    shot(page, "agents")
    assert errors == []
    page.close()
