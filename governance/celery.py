"""The Celery app. Broker and results come from REDIS_URL; without it the embedded
default uses an in-memory broker (periodic work is wired up in its own issue)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "governance.settings")

app = Celery("governance")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
