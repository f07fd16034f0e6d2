from __future__ import annotations

import pytest

PAGES = ["/console/", "/console/budgets/", "/console/budgets/tenant/cus_acme/"]


@pytest.mark.parametrize("url", PAGES)
def test_it_redirects_anonymous_visitors_to_the_admin_login(client, acme_budget, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"/admin/login/?next={url}"


@pytest.mark.parametrize("url", PAGES)
def test_it_refuses_signed_in_non_staff(user_client, acme_budget, url):
    assert user_client.get(url).status_code == 403


def test_it_refuses_non_staff_posts(user_client, acme_budget):
    response = user_client.post(PAGES[2], {"action": "reset", "reason": "x", "confirm": "on"})
    assert response.status_code == 403
    assert acme_budget.periods.filter(closed_at__isnull=False).count() == 0


@pytest.mark.parametrize("url", PAGES)
def test_it_shows_each_page_to_staff(staff_client, acme_budget, url):
    assert staff_client.get(url).status_code == 200


def test_it_requires_a_csrf_token_on_forms(acme_budget, db):
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(get_user_model().objects.create_user("carol", is_staff=True))
    response = client.post(PAGES[2], {"action": "reset", "reason": "x", "confirm": "on"})
    assert response.status_code == 403
