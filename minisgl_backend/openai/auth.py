"""`--api-key`, as vLLM's: every `/v1/...` request must carry `Authorization: Bearer <key>`.

The probes of routers, gateways and Kubernetes (`/health`, `/metrics`, `/get_load`,
`/server_info`, `/model_info`, ...) stay open, as do CORS preflights (OPTIONS). A refused
request gets 401 in OpenAI's error shape with `code: "invalid_api_key"`.
"""

from __future__ import annotations

import json
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from minisgl_backend.openai.errors import OpenAIError


class ApiKeyMiddleware:
    """A pure ASGI middleware (no per-request task or body wrapping, so streaming is untouched)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("ApiKeyMiddleware needs a non-empty key")
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _protected(scope["path"]):
            error = self._refusal(scope)
            if error is not None:
                body = json.dumps(error.body()).encode()
                await send({"type": "http.response.start", "status": error.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"www-authenticate", b'Bearer realm="minisgl"')]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> OpenAIError | None:
        header = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        if header is None:
            return _unauthorized("no API key: send the header 'Authorization: Bearer <key>' "
                                 "(this server was started with --api-key)")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self._key):
            return _unauthorized("the API key in the Authorization header is not valid for this server")
        return None


def _protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, "invalid_request_error", None, "invalid_api_key")
