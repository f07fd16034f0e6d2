from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # A broken catalog stops the start, naming the file, entry and problem, rather
        # than failing the first call that needs a price.
        from .catalog import get_catalog

        get_catalog()
