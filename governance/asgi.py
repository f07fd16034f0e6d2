"""The ASGI application: Django, with the gateway's hot path kept lean.

Under ASGI, Django runs each request in a "thread-sensitive context": the request
signals and every middleware written as process_request/process_response hop onto a
thread made for that request, about fifteen hops a call. The gateway's views are async
and need none of that middleware (no sessions, cookies, CSRF or HTML), so its paths are
served by `GatewayHandler`: Django's own request and response objects and view
functions, without the middleware, the request signals or the per-request thread. The
views tidy their own database connections (routing.views.in_thread). Every other path
(console, admin, operator API, webhooks) goes through Django's full handler.
"""

import asyncio
import gc
import logging
import os
import tempfile

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "governance.settings")

django_application = get_asgi_application()

from django.conf import settings  # noqa: E402  (after Django is set up)
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.http import JsonResponse  # noqa: E402

from routing import upstream  # noqa: E402
from routing import views as gateway_views  # noqa: E402

log = logging.getLogger("governance.gateway")

GATEWAY_VIEWS = {
    "/v1/chat/completions": gateway_views.chat_completions,
    "/v1/models": gateway_views.list_models,
}


class GatewayHandler(ASGIHandler):
    """Serves the gateway's paths with their views, and nothing around them."""

    def load_middleware(self, is_async=False):
        self._middleware_chain = None  # never used: _view_response calls the view

    async def __call__(self, scope, receive, send):
        await self.handle(scope, receive, send)  # no thread-sensitive context: no sync code

    async def handle(self, scope, receive, send):
        body_file, too_large = await self._read_limited_body(receive)
        if body_file is None:
            return  # the client went away before sending its body
        try:
            request, error = self.create_request(scope, body_file)
            if request is None:
                await self.send_response(error, send)
                return
            if too_large:
                response = gateway_views.error_response(
                    "request_too_large",
                    f"the request body is larger than {settings.GATEWAY_MAX_BODY_BYTES} bytes",
                    413,
                    gateway_views.new_request_id(),
                )
                await self.send_response(response, send)
                return
            await self._serve(request, receive, send)
        finally:
            body_file.close()

    async def _serve(self, request, receive, send):
        async def respond():
            response = await self._view_response(request)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # the client disconnected during the response
            finally:
                for closer in response._resource_closers:
                    closer()

        # A plain call is charged after its reply is sent (routing.views._after_reply);
        # this call ends, and shutdown waits for it, once that charge is written.
        gateway_views.charge_after_reply()
        # As Django does: a client that disconnects cancels the view (a stream's
        # generator then settles what it used).
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(respond()),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if not task.done():
                task.cancel()
            try:
                await task
            except (asyncio.CancelledError, RequestAborted):
                pass
            except Exception:
                log.exception("gateway request %s failed", request.path_info)
        charges = gateway_views.charges_after_reply()
        if charges:
            await asyncio.wait(charges)

    async def _view_response(self, request):
        view = GATEWAY_VIEWS[request.path_info]
        try:
            response = await view(request)
        except Exception:  # the views answer their own errors; this is a bug
            log.exception("gateway view %s failed", request.path_info)
            response = JsonResponse(
                {"object": "error", "message": "the gateway failed", "code": "internal_error"},
                status=500,
            )
        response["X-Content-Type-Options"] = "nosniff"
        return response

    async def _read_limited_body(self, receive):
        """The body as Django reads it, but never more than GATEWAY_MAX_BODY_BYTES
        kept: past that, the rest is read and dropped and the call refused (413)."""
        body_file = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - handle() closes it
            max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE, mode="w+b"
        )
        size, too_large = 0, False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                body_file.close()
                return None, False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > settings.GATEWAY_MAX_BODY_BYTES:
                too_large = True
            elif chunk:
                body_file.write(chunk)
            if not message.get("more_body", False):
                break
        body_file.seek(0)
        return body_file, too_large


gateway_application = GatewayHandler()

# Everything loaded so far (Django, the SDK's pydantic models, the catalog) lives as
# long as the process: out of the collector's generations, a full collection no longer
# walks it on the request path.
gc.freeze()


async def lifespan(receive, send):
    """Start-up has the gateway send its common statements from this event loop
    (PostgreSQL); shutdown waits for the charges of answered calls and closes the
    loop's database and upstream connections."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            gateway_views.use_loop_database()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await gateway_views.settle_charges(settings.GATEWAY_SHUTDOWN_CHARGE_SECONDS)
            await gateway_views.close_loop_database()
            await upstream.close_client()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send):
    if scope["type"] == "http" and scope["path"] in GATEWAY_VIEWS and not scope.get("root_path"):
        await gateway_application(scope, receive, send)
    elif scope["type"] == "lifespan":
        await lifespan(receive, send)
    else:
        await django_application(scope, receive, send)
