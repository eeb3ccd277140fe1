"""FastAPI dependencies shared by every route group of the guard (the prediction API in
:mod:`.app` and the admin groups in their own modules): the caller's API key, authenticated
for a scope, from ``Authorization: Bearer`` or ``X-API-Key``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from advguard.guard.pipeline import Guard
from advguard.guard.storage import KeyRecord

bearer = HTTPBearer(auto_error=False, scheme_name="bearerAuth", description="API key")
api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="apiKeyHeader", description="API key"
)


def key_dependency(guard: Guard, scope: str) -> Callable[..., Awaitable[KeyRecord]]:
    """A dependency that authenticates the caller's API key for ``scope``: on the event loop
    when that reads nothing from the database, else in the thread pool."""

    async def dep(
        request: Request,
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        x_api_key: Annotated[str | None, Depends(api_key_header)],
    ) -> KeyRecord:
        auth = f"Bearer {cred.credentials}" if cred is not None else None
        if guard.auth_is_local(auth, x_api_key):  # cached rows: a hash and a dict lookup
            return guard.authenticate(auth, x_api_key, scope)
        return await run_in_threadpool(guard.authenticate, auth, x_api_key, scope)

    return dep


#: The OpenAPI security requirement of an authenticated route (either scheme).
SECURITY: list[dict[str, list[str]]] = [
    {bearer.scheme_name: []},
    {api_key_header.scheme_name: []},
]


async def request_key(
    guard: Guard, request: Request, scope: str, model: str | None = None
) -> KeyRecord:
    """What :func:`key_dependency` does, for the hot prediction routes, without FastAPI's
    dependency resolution (a sixth of the guard's CPU per request in a profile): the key from
    ``Authorization: Bearer`` or ``X-API-Key``, authenticated for ``scope``. Those routes
    declare :data:`SECURITY` in their OpenAPI operation themselves. When the key's rows must
    be read (in the thread pool), ``model``'s isolation is read there too if it is not cached
    (:meth:`Guard.warm_isolation`), so that the request's pipeline may run on the event loop."""
    headers = request.headers
    auth, x_api_key = headers.get("authorization"), headers.get("x-api-key")
    if guard.auth_is_local(auth, x_api_key):
        return guard.authenticate(auth, x_api_key, scope)
    if model is None:
        return await run_in_threadpool(guard.authenticate, auth, x_api_key, scope)

    def authenticate_and_warm() -> KeyRecord:
        key = guard.authenticate(auth, x_api_key, scope)
        guard.warm_isolation(model)
        return key

    return await run_in_threadpool(authenticate_and_warm)
