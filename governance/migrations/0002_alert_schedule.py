"""Schedule alert delivery (the other periodic tasks are seeded in budgets 0005)."""

from django.db import migrations

TASK = "governance.deliver_alerts"


def seed(apps, schema_editor):
    interval_model = apps.get_model("django_celery_beat", "IntervalSchedule")
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    every, _ = interval_model.objects.get_or_create(every=60, period="seconds")
    task_model.objects.get_or_create(name=TASK, defaults={"task": TASK, "interval": every})


def unseed(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=TASK).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0001_initial"),
        ("budgets", "0005_periodic_schedules"),
    ]

    operations = [migrations.RunPython(seed, unseed)]
