"""Seed the periodic tasks (django-celery-beat reads them from the database; operators
can change or disable them in the admin). Every task is idempotent and safe to run
twice, and nothing depends on one running on time."""

from django.db import migrations

SCHEDULES = {
    # task name: every N seconds
    "budgets.expire_holds": 60,
    "budgets.materialize_periods": 60,
    "spend.rollup_hourly": 300,
    "spend.detect_spikes": 60,
    "spend.report_usage_to_stripe": 60,
    "webhooks.suspend_overdue_tenants": 900,
}


def seed(apps, schema_editor):
    interval_model = apps.get_model("django_celery_beat", "IntervalSchedule")
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    for task, seconds in SCHEDULES.items():
        every, _ = interval_model.objects.get_or_create(every=seconds, period="seconds")
        task_model.objects.get_or_create(
            name=task, defaults={"task": task, "interval": every, "enabled": True}
        )


def unseed(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name__in=SCHEDULES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("budgets", "0004_periodic_work"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(seed, unseed)]
