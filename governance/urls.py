from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from governance.admin import model_prices
from governance.metrics import metrics_view
from routing import authorizations
from routing import views as gateway
from webhooks.views import stripe_webhook

admin.site.site_header = "Spend Governance"
admin.site.site_title = "Spend Governance"

urlpatterns = [
    path("", RedirectView.as_view(url="/console/", permanent=False)),
    path("admin/model-prices/", admin.site.admin_view(model_prices), name="model-prices"),
    path("admin/", admin.site.urls),
    path("v1/chat/completions", gateway.chat_completions, name="chat-completions"),
    path("v1/models", gateway.list_models, name="models"),
    path("api/authorizations", authorizations.authorize, name="authorize"),
    path("api/authorizations/<str:request_id>/capture", authorizations.capture, name="capture"),
    path("api/authorizations/<str:request_id>/void", authorizations.void, name="void"),
    path("api/webhooks/stripe", stripe_webhook, name="stripe-webhook"),
    path("metrics", metrics_view, name="metrics"),
    path("api/", include("governance.api_urls")),
    path("console/", include("governance.console_urls")),
]
