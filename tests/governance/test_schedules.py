"""The periodic tasks are seeded by a migration and each names a registered task."""

from django_celery_beat.models import PeriodicTask

from governance.celery import app

EXPECTED = {
    "budgets.expire_holds": 60,
    "budgets.materialize_periods": 60,
    "spend.rollup_hourly": 300,
    "spend.detect_spikes": 60,
    "spend.report_usage_to_stripe": 60,
    "webhooks.suspend_overdue_tenants": 900,
    "governance.deliver_alerts": 60,
}


def test_the_migration_seeds_every_periodic_task(db):
    seeded = {t.task: t.interval.every for t in PeriodicTask.objects.select_related("interval")}
    assert EXPECTED.items() <= seeded.items()
    assert all(t.enabled for t in PeriodicTask.objects.filter(task__in=EXPECTED))


def test_every_scheduled_task_is_registered(db):
    app.loader.import_default_modules()
    for task in PeriodicTask.objects.exclude(task="celery.backend_cleanup"):
        assert task.task in app.tasks, f"{task.task} is scheduled but no worker knows it"


def test_each_task_runs_on_real_rows(acme, now):
    from budgets import services
    from budgets.tasks import expire_holds, materialize_periods
    from spend.tasks import detect_spikes, report_usage_to_stripe, rollup_hourly

    services.set_policy(acme, "tenant", limit_nanos=10**9)
    assert materialize_periods() == 1
    assert materialize_periods() == 0
    assert expire_holds() == 0
    assert rollup_hourly() == 0
    assert detect_spikes() == 0
    assert report_usage_to_stripe()["enabled"] is False
