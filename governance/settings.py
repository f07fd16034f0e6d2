"""Settings, all from the environment (12-factor) with safe defaults for the embedded
mode. Every variable read here is listed in .env.example."""

from __future__ import annotations

import secrets
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from budgets.money import InvalidAmount, usd_to_nanos

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)


def _setting(name: str, parse, default):
    """Read one variable and turn a bad value into an error that names it. An empty
    value means the default, so .env.example can be copied as it is."""
    if env.str(name, default="").strip() == "":
        return default
    try:
        return parse(name, default=default)
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from exc


def _bool(name: str, default: bool) -> bool:
    raw = env.str(name, default="").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={raw!r}: use true or false")


def _usd_setting(name: str, default: str, *, optional: bool = False) -> int | None:
    raw = env.str(name, default="").strip() or default
    if optional and raw == "":
        return None
    try:
        nanos = usd_to_nanos(raw)
    except InvalidAmount as exc:
        raise ImproperlyConfigured(f"{name}={raw!r}: {exc}") from exc
    if nanos <= 0:
        raise ImproperlyConfigured(f"{name}={raw!r}: must be a positive amount of USD")
    return nanos


def _embedded_secret_key() -> str:
    """The embedded default keeps a random key under var/ so sessions survive restarts;
    a deployment sets SECRET_KEY."""
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


DEBUG = _bool("DEBUG", False)
SECRET_KEY = env.str("SECRET_KEY", default="").strip() or _embedded_secret_key()
ALLOWED_HOSTS = _setting("ALLOWED_HOSTS", env.list, ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = _setting("CSRF_TRUSTED_ORIGINS", env.list, [])

# Behind a TLS-terminating proxy a deployment turns these on (see README, "Deploying").
SECURE_SSL_REDIRECT = _bool("SECURE_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = _bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = _bool("CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = _setting("SECURE_HSTS_SECONDS", env.int, 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0
if _bool("SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "servestatic.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "governance",
    "budgets",
    "spend",
    "routing",
    "webhooks",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Async-capable (WhiteNoise's middleware is sync-only, which under ASGI would send
    # every request, gateway calls included, through Django's single sync thread).
    "servestatic.middleware.ServeStaticMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "governance.urls"
ASGI_APPLICATION = "governance.asgi.application"
WSGI_APPLICATION = "governance.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------------
# Embedded default: SQLite under var/. Scale-out: DATABASE_URL=postgres://...
_default_sqlite = f"sqlite:///{VAR_DIR / 'governance.sqlite3'}"
try:
    DATABASES = {
        "default": env.db_url_config(env.str("DATABASE_URL", default="") or _default_sqlite)
    }
except (ImproperlyConfigured, ValueError, KeyError) as exc:
    raise ImproperlyConfigured(f"DATABASE_URL: {exc}") from exc
_ENGINES = ("django.db.backends.sqlite3", "django.db.backends.postgresql")
if DATABASES["default"]["ENGINE"] not in _ENGINES:
    raise ImproperlyConfigured(
        "DATABASE_URL: use postgres://user:password@host:5432/name or sqlite:///path/to/file"
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE takes the write lock at BEGIN, so two writers queue instead of failing
    # half-way with "database is locked"; WAL lets readers run beside the writer.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    if DATABASES["default"]["NAME"] not in ("", ":memory:"):
        Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
else:
    # No per-request "SELECT 1": a connection that failed is dropped after the failing
    # call instead (routing.views.in_thread, Django's request signals).
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = False
# Django's own requests (console, admin, operator API, webhooks) connect per request:
# under ASGI each runs in a thread made for it, so a connection kept past the request
# would belong to no one until that thread was collected (one new, lingering connection
# per request). The gateway's database threads are few and live as long as the process:
# they keep theirs, and the statements prepared on it, for GATEWAY_DB_CONN_MAX_AGE
# seconds (routing.views).
DATABASES["default"]["CONN_MAX_AGE"] = 0
GATEWAY_DB_CONN_MAX_AGE = _setting("DB_CONN_MAX_AGE", env.int, 600)
if GATEWAY_DB_CONN_MAX_AGE < 0:
    raise ImproperlyConfigured("DB_CONN_MAX_AGE: cannot be negative (0: a connection per call)")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Stopping: uvicorn lets requests in flight finish for SERVER_GRACEFUL_SHUTDOWN_SECONDS
# (a gateway call ends once its charge is written), then the lifespan gives charges
# still running GATEWAY_SHUTDOWN_CHARGE_SECONDS more (routing.views.settle_charges).
SERVER_GRACEFUL_SHUTDOWN_SECONDS = 5
GATEWAY_SHUTDOWN_CHARGE_SECONDS = 5

# --- Cache and Celery ---------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="").strip()
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# Embedded default: a broker on the file system under var/ (no server to run), so the
# worker and beat that `make run` starts really run the periodic tasks. Scale-out: Redis.
CELERY_BROKER_URL = REDIS_URL or "filesystem://"
if not REDIS_URL:
    _queue = VAR_DIR / "celery" / "queue"
    _queue.mkdir(parents=True, exist_ok=True)
    (VAR_DIR / "celery" / "control").mkdir(exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue),
        "data_folder_out": str(_queue),
        "control_folder": str(VAR_DIR / "celery" / "control"),
        "store_processed": False,
    }
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"

# --- Auth, i18n, static -------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # filled by collectstatic (make run)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "servestatic.storage.CompressedStaticFilesStorage"},
}

# json: one JSON object a line (for log shippers); text: plain lines for a terminal.
# Both mask anything shaped like a key or secret.
LOG_FORMAT = env.str("LOG_FORMAT", default="").strip().lower() or "json"
if LOG_FORMAT not in ("json", "text"):
    raise ImproperlyConfigured(f"LOG_FORMAT={LOG_FORMAT!r}: use json or text")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "governance.logs.JsonFormatter"},
        "text": {
            "()": "governance.logs.TextFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
        },
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="").upper() or "INFO"},
    # The upstream client logs every request at INFO; the gateway logs each call itself.
    "loggers": {"httpx2": {"level": "WARNING"}, "httpcore2": {"level": "WARNING"}},
}

# --- Operator API -------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Spend Governance operator API",
    "DESCRIPTION": "Budgets, spend, tenants, agents and keys. Money is in USD decimal strings.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI served from our own static files: the docs work without internet access.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Budgets ------------------------------------------------------------------------
# Budgets for scopes that have no policy of their own, in USD per day. The tenant
# default always applies (a tenant is never ungoverned); agent and user defaults are
# off unless set.
DEFAULT_DAILY_BUDGET_NANOS = _usd_setting("DEFAULT_DAILY_BUDGET", "10")
DEFAULT_AGENT_DAILY_BUDGET_NANOS = _usd_setting("DEFAULT_AGENT_DAILY_BUDGET", "", optional=True)
DEFAULT_USER_DAILY_BUDGET_NANOS = _usd_setting("DEFAULT_USER_DAILY_BUDGET", "", optional=True)
# A hold not captured or voided by then is released by expire_holds.
HOLD_TTL_SECONDS = _setting("HOLD_TTL_SECONDS", env.int, 600)
# Below this many affordable output tokens a call is refused (or sent to a cheaper model).
MIN_OUTPUT_TOKENS = _setting("MIN_OUTPUT_TOKENS", env.int, 16)
if HOLD_TTL_SECONDS <= 0:
    raise ImproperlyConfigured("HOLD_TTL_SECONDS: must be a positive number of seconds")
if MIN_OUTPUT_TOKENS <= 0:
    raise ImproperlyConfigured("MIN_OUTPUT_TOKENS: must be a positive number of tokens")

# --- Routing and upstream -----------------------------------------------------------
# The model catalog: prices, context windows, aliases, downgrade and fallback chains.
MODEL_CATALOG_PATH = Path(
    env.str("MODEL_CATALOG_PATH", default="").strip() or BASE_DIR / "routing" / "catalog.yaml"
)
MISTRAL_API_KEY = env.str("MISTRAL_API_KEY", default="").strip()
# Without a key the embedded default calls the local simulator (`make run` starts it),
# and the health endpoint and console say so.
SIMULATOR_PORT = _setting("SIMULATOR_PORT", env.int, 8900)
UPSTREAM_SIMULATED = MISTRAL_API_KEY == ""
MISTRAL_SERVER_URL = env.str("MISTRAL_SERVER_URL", default="").strip() or (
    f"http://127.0.0.1:{SIMULATOR_PORT}" if UPSTREAM_SIMULATED else "https://api.mistral.ai"
)
# Upstream timeout for one call, in milliseconds (streams: between chunks and overall).
MISTRAL_TIMEOUT_MS = _setting("MISTRAL_TIMEOUT_MS", env.int, 60_000)
# Consecutive upstream failures of a model that open its circuit, and for how long.
CIRCUIT_BREAKER_FAILURES = _setting("CIRCUIT_BREAKER_FAILURES", env.int, 5)
CIRCUIT_BREAKER_COOLDOWN_SECONDS = _setting("CIRCUIT_BREAKER_COOLDOWN_SECONDS", env.int, 30)
# Largest request body the gateway accepts (bytes); larger: 413.
GATEWAY_MAX_BODY_BYTES = _setting("GATEWAY_MAX_BODY_BYTES", env.int, 8 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = GATEWAY_MAX_BODY_BYTES
# Seconds an authenticated key (with its agent and tenant) is cached by a web process:
# a revocation, pause or suspension takes effect within this long.
KEY_CACHE_SECONDS = _setting("KEY_CACHE_SECONDS", env.int, 5)
# Threads per web process that run the gateway's database work, each with its own
# connection. With its event loop's (below), a web process opens up to twice this many
# database connections for the gateway.
GATEWAY_DB_THREADS = _setting("GATEWAY_DB_THREADS", env.int, 8)
# On PostgreSQL the common call's two statements go out from the event loop
# (budgets.pgloop) on up to GATEWAY_DB_THREADS connections of its own; off: from a thread.
GATEWAY_LOOP_STATEMENTS = _bool("GATEWAY_LOOP_STATEMENTS", True)
for _name in (
    "MISTRAL_TIMEOUT_MS",
    "CIRCUIT_BREAKER_FAILURES",
    "GATEWAY_MAX_BODY_BYTES",
    "GATEWAY_DB_THREADS",
):
    if globals()[_name] <= 0:
        raise ImproperlyConfigured(f"{_name}: must be a positive number")
if CIRCUIT_BREAKER_COOLDOWN_SECONDS < 0 or KEY_CACHE_SECONDS < 0:
    raise ImproperlyConfigured(
        "CIRCUIT_BREAKER_COOLDOWN_SECONDS and KEY_CACHE_SECONDS cannot be negative"
    )

# --- Stripe -------------------------------------------------------------------------
# Stripe features are off until keys are set.
STRIPE_SECRET_KEY = env.str("STRIPE_SECRET_KEY", default="").strip()
STRIPE_WEBHOOK_SECRET = env.str("STRIPE_WEBHOOK_SECRET", default="").strip()
# Seconds a webhook's signature timestamp may be old (Stripe's default tolerance).
STRIPE_WEBHOOK_TOLERANCE_SECONDS = _setting("STRIPE_WEBHOOK_TOLERANCE_SECONDS", env.int, 300)
# The Billing meter's event name usage is reported under; empty: no usage export.
STRIPE_METER_EVENT_NAME = env.str("STRIPE_METER_EVENT_NAME", default="").strip()
# What one meter unit is: micro_usd (1e-6 USD), milli_usd, cents, or tokens.
STRIPE_METER_UNIT = env.str("STRIPE_METER_UNIT", default="").strip() or "micro_usd"
# Hours after a failed payment before the tenant is suspended.
PAYMENT_FAILED_GRACE_HOURS = _setting("PAYMENT_FAILED_GRACE_HOURS", env.int, 72)
# Stripe's API base address (tests point it at a mock).
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="").strip() or "https://api.stripe.com"
if STRIPE_METER_UNIT not in ("micro_usd", "milli_usd", "cents", "tokens"):
    raise ImproperlyConfigured("STRIPE_METER_UNIT: use micro_usd, milli_usd, cents or tokens")
if STRIPE_WEBHOOK_TOLERANCE_SECONDS <= 0 or PAYMENT_FAILED_GRACE_HOURS < 0:
    raise ImproperlyConfigured(
        "STRIPE_WEBHOOK_TOLERANCE_SECONDS must be positive, PAYMENT_FAILED_GRACE_HOURS not negative"
    )

# --- Spike detection (see spend/spikes.py for the method) ---------------------------
# Standard deviations above the trailing 24-hour mean that make an hour a spike.
SPIKE_SIGMAS = _setting("SPIKE_SIGMAS", env.int, 4)
# ...and at least this many times the mean...
SPIKE_MIN_RATIO = _setting("SPIKE_MIN_RATIO", env.int, 3)
# ...and at least this much USD in the hour, so small amounts are never spikes.
SPIKE_MIN_NANOS_PER_HOUR = _usd_setting("SPIKE_MIN_USD_PER_HOUR", "1")
if SPIKE_SIGMAS <= 0 or SPIKE_MIN_RATIO <= 0:
    raise ImproperlyConfigured("SPIKE_SIGMAS and SPIKE_MIN_RATIO must be positive")

# --- Alerts -------------------------------------------------------------------------
# Outgoing mail for email alert channels: smtp+tls://user:password@host:587, or the
# default consolemail:// (printed to the log), for the embedded mode.
EMAIL_URL = env.str("EMAIL_URL", default="").strip() or "consolemail://"
try:
    vars().update(environ.Env.email_url_config(EMAIL_URL))
except (ValueError, KeyError) as exc:
    raise ImproperlyConfigured(f"EMAIL_URL: {exc}") from None
EMAIL_TIMEOUT = _setting("EMAIL_TIMEOUT", env.int, 10)
ALERT_FROM_EMAIL = env.str("ALERT_FROM_EMAIL", default="").strip() or "spend-governance@localhost"
# The console's public address, for links in alerts; empty: alerts carry no link.
CONSOLE_BASE_URL = env.str("CONSOLE_BASE_URL", default="").strip()
# Budget events and spikes older than this are never alerted (keeps each run cheap).
ALERT_LOOKBACK_HOURS = _setting("ALERT_LOOKBACK_HOURS", env.int, 24)
# Attempts per alert and channel before it is marked failed; the waits between them
# double from ALERT_RETRY_SECONDS up to an hour.
ALERT_MAX_ATTEMPTS = _setting("ALERT_MAX_ATTEMPTS", env.int, 8)
ALERT_RETRY_SECONDS = _setting("ALERT_RETRY_SECONDS", env.int, 60)
# Seconds a webhook channel has to connect and to answer.
ALERT_TIMEOUT_SECONDS = _setting("ALERT_TIMEOUT_SECONDS", env.float, 5.0)
for _name in (
    "EMAIL_TIMEOUT",
    "ALERT_LOOKBACK_HOURS",
    "ALERT_MAX_ATTEMPTS",
    "ALERT_RETRY_SECONDS",
    "ALERT_TIMEOUT_SECONDS",
):
    if globals()[_name] <= 0:
        raise ImproperlyConfigured(f"{_name}: must be a positive number")

# --- Console ------------------------------------------------------------------------
# Seconds between the console's live refreshes of its numbers and charts; 0: no refresh.
CONSOLE_REFRESH_SECONDS = _setting("CONSOLE_REFRESH_SECONDS", env.int, 10)
if CONSOLE_REFRESH_SECONDS < 0:
    raise ImproperlyConfigured("CONSOLE_REFRESH_SECONDS: cannot be negative")

# --- Metrics ------------------------------------------------------------------------
# Bearer token Prometheus sends to read /metrics; empty: staff sessions only.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="").strip()
