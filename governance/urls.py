from django.contrib import admin
from django.urls import path

admin.site.site_header = "Spend Governance"
admin.site.site_title = "Spend Governance"

urlpatterns = [
    path("admin/", admin.site.urls),
]
