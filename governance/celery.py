"""The Celery app. The broker is REDIS_URL; without it (the embedded default) a broker on
the file system under var/. Periodic tasks are scheduled by django-celery-beat from the
database (seeded by a migration, editable in the admin)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "governance.settings")

app = Celery("governance")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
