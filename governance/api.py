"""What every operator API view shares: who may call (staff by session or DRF token,
agent keys read-only on their own tenant), how bodies are parsed (JSON numbers as
Decimal, never float), how lists are paginated, and the one error shape
`{"error": {"code", "message", "details"}}`. Plus the health endpoint.

Views set these as class attributes (OperatorView) rather than relying on
REST_FRAMEWORK defaults, so the API and its schema are the same whatever the settings.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.cache import cache, caches
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.db import connection
from django.http import Http404
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    inline_serializer,
)
from rest_framework import exceptions, serializers
from rest_framework.authentication import (
    BaseAuthentication,
    SessionAuthentication,
    TokenAuthentication,
    get_authorization_header,
)
from rest_framework.generics import GenericAPIView
from rest_framework.metadata import SimpleMetadata
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import JSONParser
from rest_framework.permissions import SAFE_METHODS, AllowAny, BasePermission
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import set_rollback

from budgets import services
from budgets.errors import GovernanceError, InvalidApiKey
from budgets.models import Agent, ApiKey, Tenant
from governance.http import STATUS_BY_CODE, error_details, status_for

log = logging.getLogger("governance.api")

NON_FIELD = api_settings.NON_FIELD_ERRORS_KEY

# --- Parsing ------------------------------------------------------------------------


class DecimalJSONParser(JSONParser):
    """JSON with numbers as Decimal: 0.1 stays 0.1 on its way to nanodollars."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            decoded = codecs.getreader(encoding)(stream)
            return json.load(decoded, parse_float=Decimal, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# --- Who is calling -----------------------------------------------------------------


@dataclass
class AgentPrincipal:
    """request.user for a call made with an agent key: it reads its own tenant, only."""

    key: ApiKey
    is_authenticated: bool = field(default=True, init=False)
    is_anonymous: bool = field(default=False, init=False)
    is_staff: bool = field(default=False, init=False)
    is_active: bool = field(default=True, init=False)

    @property
    def agent(self) -> Agent:
        return self.key.agent

    @property
    def tenant(self) -> Tenant:
        return self.key.agent.tenant

    def get_username(self) -> str:
        return f"agent key {self.key.prefix}"


class AgentKeyAuthentication(BaseAuthentication):
    """`Authorization: Bearer sgk_...`, the key agents use on the gateway."""

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != b"bearer":
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "send the agent key as 'Authorization: Bearer sgk_...'", code="invalid_api_key"
            )
        try:
            raw_key = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed(
                "the API key is malformed", code="invalid_api_key"
            ) from None
        try:
            key = services.authenticate_key(raw_key)
        except InvalidApiKey as exc:
            raise exceptions.AuthenticationFailed(exc.message, code="invalid_api_key") from None
        return AgentPrincipal(key), key

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


def calling_tenant(request) -> Tenant | None:
    """The only tenant an agent key may see; None for staff, who see every tenant."""
    user = request.user
    return user.tenant if isinstance(user, AgentPrincipal) else None


class OperatorAccess(BasePermission):
    """Staff may do everything. An agent key may read the views marked agent_readable
    (budgets and spend), and only its own tenant's rows: those views filter by
    calling_tenant, and answer 404 for another tenant's scope, as for a missing one."""

    message = "this endpoint is for staff users"

    def has_permission(self, request, view) -> bool:
        user = request.user
        if isinstance(user, AgentPrincipal):
            if request.method not in SAFE_METHODS:
                self.message = "an agent key can only read"
                return False
            if not getattr(view, "agent_readable", False):
                self.message = "an agent key can only read budgets and spend"
                return False
            return True
        if user is None or not user.is_authenticated:
            return False
        return bool(user.is_active and user.is_staff)


# --- Pagination ---------------------------------------------------------------------


class OperatorPagination(PageNumberPagination):
    """Page numbers from 1; a page past the last is a 404. A page or page size that is
    not a whole number in range is refused (400), not silently replaced."""

    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200

    def _number(self, request, name: str, maximum: int | None = None) -> int | None:
        raw = request.query_params.get(name)
        if raw is None:
            return None
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= (maximum or 10**9):
            limit = f" and at most {maximum}" if maximum else ""
            raise exceptions.ValidationError({name: [f"must be a whole number from 1{limit}"]})
        return int(raw)

    def get_page_size(self, request) -> int:
        return self._number(request, self.page_size_query_param, self.max_page_size) or (
            self.page_size
        )

    def get_page_number(self, request, paginator) -> int:
        return self._number(request, self.page_query_param) or 1

    def get_schema_operation_parameters(self, view) -> list[dict]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"]["maximum"] = self.max_page_size
            else:
                parameter["schema"]["maximum"] = 10**9
        return parameters


# --- Errors -------------------------------------------------------------------------

# What each DRF exception is called in our error codes (governance/http.py has the
# statuses). Codes missing from STATUS_BY_CODE keep the exception's own status.
_DRF_CODES: list[tuple[type[exceptions.APIException], str]] = [
    (exceptions.ValidationError, "invalid_request"),
    (exceptions.ParseError, "malformed_json"),
    (exceptions.UnsupportedMediaType, "unsupported_media_type"),
    (exceptions.NotAuthenticated, "not_authenticated"),
    (exceptions.AuthenticationFailed, "authentication_failed"),
    (exceptions.PermissionDenied, "forbidden"),
    (exceptions.NotFound, "not_found"),
    (exceptions.MethodNotAllowed, "method_not_allowed"),
    (exceptions.NotAcceptable, "not_acceptable"),
    (exceptions.Throttled, "throttled"),
]


def field_messages(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested error detail as {"field.sub.0": ["message", ...]}."""
    if isinstance(detail, dict):
        messages: dict[str, list[str]] = {}
        for name, value in detail.items():
            name = NON_FIELD if name == "__all__" else str(name)
            for key, texts in field_messages(value, f"{prefix}.{name}" if prefix else name).items():
                messages.setdefault(key, []).extend(texts)
        return messages
    if isinstance(detail, list | tuple):
        if all(not isinstance(item, dict | list | tuple) for item in detail):
            return {prefix or NON_FIELD: [str(item) for item in detail]} if detail else {}
        messages = {}
        for index, item in enumerate(detail):
            for key, texts in field_messages(item, f"{prefix}.{index}").items():
                messages.setdefault(key, []).extend(texts)
        return messages
    return {prefix or NON_FIELD: [str(detail)]}


def _summary(fields: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {' '.join(texts)}" for name, texts in fields.items())


def _describe(exc: exceptions.APIException) -> tuple[str, str, dict[str, Any]]:
    """The code, message and details of a DRF exception."""
    code = next((code for kind, code in _DRF_CODES if isinstance(exc, kind)), None)
    if isinstance(exc, exceptions.ValidationError):
        fields = field_messages(exc.detail)
        return "invalid_request", _summary(fields) or "invalid request", {"fields": fields}
    if isinstance(exc, exceptions.AuthenticationFailed) and exc.get_codes() == "invalid_api_key":
        code = "invalid_api_key"
    details: dict[str, Any] = {}
    if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
        details["retry_after_seconds"] = int(exc.wait)
    message = exc.detail if isinstance(exc.detail, str) else _summary(field_messages(exc.detail))
    return code or str(exc.default_code), str(message), details


def _governance_details(exc: GovernanceError) -> dict[str, Any]:
    details = error_details(exc)
    if isinstance(details.get("fields"), dict):
        details["fields"] = field_messages(details["fields"])
    return details


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """Every error of the operator API as {"error": {"code", "message", "details"}};
    validation errors carry {"fields": {"name": ["message", ...]}} in details."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(*exc.args)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    headers: dict[str, str] = {}
    if isinstance(exc, GovernanceError):
        code, message, details = exc.code, exc.message, _governance_details(exc)
        status = status_for(code)
    elif isinstance(exc, exceptions.APIException):
        code, message, details = _describe(exc)
        # Codes not (yet) in the table keep DRF's status: for an authentication failure
        # that is 401, or 403 when the view offers no scheme to authenticate with.
        status = STATUS_BY_CODE.get(code, exc.status_code)
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        if getattr(exc, "wait", None):
            headers["Retry-After"] = str(int(exc.wait))
    else:
        return None
    set_rollback()
    return Response(error_body(code, message, details), status=status, headers=headers)


# --- Schema -------------------------------------------------------------------------


class AgentKeyScheme(OpenApiAuthenticationExtension):
    target_class = "governance.api.AgentKeyAuthentication"
    name = "agentKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "sgk_<key id>_<secret>",
            "description": "An agent's key: reads its own tenant's budgets and spend, "
            "nothing else.",
        }


class OperatorSchema(AutoSchema):
    """Lists the agent key as a way in only where it is accepted: reads of budgets and spend."""

    def get_auth(self):
        auths = super().get_auth()
        if getattr(self.view, "agent_readable", False) and self.method in SAFE_METHODS:
            return auths
        return [auth for auth in auths if "agentKey" not in auth]


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField(
        help_text="A stable code: invalid_request, malformed_json, unsupported_media_type, "
        "not_authenticated, authentication_failed, invalid_api_key, forbidden, not_found, "
        "method_not_allowed, ..."
    )
    message = serializers.CharField(help_text="For people; may change.")
    details = serializers.DictField(
        help_text='More about the error. Validation errors: {"fields": {"name": ["message"]}}.'
    )


class ErrorSerializer(serializers.Serializer):
    error = ErrorDetailSerializer()


def _error(description: str, code: str, message: str, details: dict | None = None):
    return OpenApiResponse(
        ErrorSerializer,
        description=description,
        examples=[
            OpenApiExample(code, value=error_body(code, message, details), response_only=True)
        ],
    )


BAD_REQUEST = _error(
    "Invalid values (details.fields names each field; code invalid_request) or malformed "
    "JSON (code malformed_json).",
    "invalid_request",
    "name: This field is required.",
    {"fields": {"name": ["This field is required."]}},
)
UNAUTHENTICATED = _error(
    "No credentials, or bad ones.",
    "not_authenticated",
    "Authentication credentials were not provided.",
)
FORBIDDEN = _error(
    "Not a staff user, or an agent key where it cannot be used.",
    "forbidden",
    "an agent key can only read",
)
NOT_FOUND = _error(
    "No such object (another tenant's objects are not found for an agent key).",
    "not_found",
    "no agent budget 'cus_acme:invoice-bot'",
)
UNSUPPORTED = _error(
    "The body is not application/json.",
    "unsupported_media_type",
    'Unsupported media type "text/plain" in request.',
)


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    """The documented errors of an operation: always 401 and 403, plus these."""
    known = {
        400: BAD_REQUEST,
        401: UNAUTHENTICATED,
        403: FORBIDDEN,
        404: NOT_FOUND,
        415: UNSUPPORTED,
    }
    return {status: known[status] for status in sorted({401, 403, *statuses})}


# --- The base of every operator view ------------------------------------------------


class OperatorMetadata(SimpleMetadata):
    """OPTIONS: the view's name, description and media types. The fields are in the
    schema at /api/schema/ (views have no single serializer_class to describe)."""

    def determine_metadata(self, request, view) -> dict[str, Any]:
        return {
            "name": view.get_view_name(),
            "description": view.get_view_description(),
            "renders": [renderer.media_type for renderer in view.renderer_classes],
            "parses": [parser.media_type for parser in view.parser_classes],
            "schema": "/api/schema/",
        }


class OperatorView(GenericAPIView):
    authentication_classes = [TokenAuthentication, AgentKeyAuthentication, SessionAuthentication]
    permission_classes = [OperatorAccess]
    parser_classes = [DecimalJSONParser]
    renderer_classes = [JSONRenderer]
    pagination_class = OperatorPagination
    metadata_class = OperatorMetadata
    filter_backends: list = []
    throttle_classes: list = []
    schema = OperatorSchema()
    # Agent keys may GET this view (their own tenant's rows only).
    agent_readable = False

    def get_exception_handler(self):
        return exception_handler

    def initial(self, request, *args, **kwargs) -> None:
        super().initial(request, *args, **kwargs)
        # PostgreSQL text cannot hold NUL: no object has such a name (CharFields refuse
        # it in bodies and query strings).
        if any("\x00" in str(value) for value in kwargs.values()):
            raise exceptions.NotFound("no such object")

    def query(self, serializer_class: type[serializers.Serializer]) -> dict[str, Any]:
        """The query string, validated. A plain dict, not the QueryDict: DRF reads an
        empty value in a QueryDict as a missing one, and `?state=` must be a 400."""
        form = serializer_class(data=self.request.query_params.dict())
        form.is_valid(raise_exception=True)
        return form.validated_data

    def body(self, serializer_class: type[serializers.Serializer]) -> dict[str, Any]:
        form = serializer_class(data=self.request.data)
        form.is_valid(raise_exception=True)
        return form.validated_data


# --- Health -------------------------------------------------------------------------


@dataclass
class Check:
    ok: bool
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail, **self.extra}


def _failed(part: str, exc: Exception) -> Check:
    log.warning("health: %s failed", part, exc_info=exc)
    # The error class only: an anonymous caller learns nothing of hosts or passwords.
    return Check(False, f"failing: {type(exc).__name__}")


def check_database() -> Check:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:
        return _failed("database", exc)
    return Check(True, f"ok ({connection.vendor})")


def check_cache() -> Check:
    key = f"health:{uuid.uuid4().hex}"
    try:
        cache.set(key, "ok", 10)
        value = cache.get(key)
        cache.delete(key)
    except Exception as exc:
        return _failed("cache", exc)
    if value != "ok":
        return Check(False, "failing: a value set in the cache could not be read back")
    return Check(True, f"ok ({type(caches['default']).__name__})")


def check_broker() -> Check:
    if not settings.REDIS_URL:
        options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {})
        folder = options.get("data_folder_in")
        if folder and not os.access(folder, os.W_OK):
            return Check(
                False,
                "failing: the file-system broker's folder is not writable",
                {"configured": False},
            )
        return Check(
            True,
            "embedded: no REDIS_URL, tasks go through the file-system broker under var/",
            {"configured": False},
        )
    import redis

    try:
        client = redis.Redis.from_url(
            settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1
        )
        client.ping()
        client.close()
    except Exception as exc:
        return Check(**{**_failed("broker", exc).__dict__, "extra": {"configured": True}})
    return Check(True, "ok (redis)", {"configured": True})


def check_upstream() -> Check:
    if settings.UPSTREAM_SIMULATED:
        return Check(
            True,
            "simulated: MISTRAL_API_KEY is not set, calls go to the local Mistral simulator",
            {"mode": "simulated"},
        )
    return Check(True, "Mistral API (MISTRAL_API_KEY is set)", {"mode": "mistral"})


def check_stripe() -> Check:
    configured = {
        "secret_key": bool(settings.STRIPE_SECRET_KEY),
        "webhook_secret": bool(settings.STRIPE_WEBHOOK_SECRET),
        "meter_event_name": bool(settings.STRIPE_METER_EVENT_NAME),
    }
    missing = [name for name, present in configured.items() if not present]
    if not missing:
        detail = "configured"
    elif len(missing) == len(configured):
        detail = "not configured: Stripe features are off"
    else:
        detail = f"partly configured: no {', '.join(missing)}"
    return Check(True, detail, configured)


def health_report() -> dict[str, Any]:
    checks = {
        "database": check_database(),
        "cache": check_cache(),
        "broker": check_broker(),
        "upstream": check_upstream(),
        "stripe": check_stripe(),
    }
    failing = [name for name, check in checks.items() if not check.ok]
    return {
        "status": "failing" if failing else "ok",
        "failing": failing,
        "checks": {name: check.as_json() for name, check in checks.items()},
    }


@extend_schema_field({"type": "string", "enum": ["ok", "failing"]})
class HealthStatusField(serializers.CharField):
    pass


class CheckSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    detail = serializers.CharField()


class BrokerCheckSerializer(CheckSerializer):
    configured = serializers.BooleanField(
        help_text="REDIS_URL is set; false: the embedded file-system broker."
    )


@extend_schema_field({"type": "string", "enum": ["simulated", "mistral"]})
class UpstreamModeField(serializers.CharField):
    pass


class UpstreamCheckSerializer(CheckSerializer):
    mode = UpstreamModeField(help_text="simulated: the local simulator, no MISTRAL_API_KEY.")


class StripeCheckSerializer(CheckSerializer):
    secret_key = serializers.BooleanField()
    webhook_secret = serializers.BooleanField()
    meter_event_name = serializers.BooleanField()


class HealthSerializer(serializers.Serializer):
    status = HealthStatusField()
    failing = serializers.ListField(child=serializers.CharField())
    checks = inline_serializer(
        "HealthChecks",
        {
            "database": CheckSerializer(),
            "cache": CheckSerializer(),
            "broker": BrokerCheckSerializer(),
            "upstream": UpstreamCheckSerializer(),
            "stripe": StripeCheckSerializer(),
        },
    )


class HealthView(OperatorView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="health",
        tags=["health"],
        summary="Is the service serving?",
        description=(
            "Checks the database (a query), the cache (set and get), the Celery broker "
            "(a Redis ping, when REDIS_URL is set), and reports whether the upstream is the "
            "real Mistral API or the local simulator, and whether Stripe is configured "
            "(not configured is not a failure). 200 when serving; 503 with the failing "
            "parts listed otherwise. No authentication."
        ),
        responses={
            200: HealthSerializer,
            503: OpenApiResponse(HealthSerializer, description="Some part is failing."),
        },
        auth=[{}],
    )
    def get(self, request):
        report = health_report()
        return Response(report, status=503 if report["failing"] else 200)
