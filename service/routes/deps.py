"""Dependencies shared by the routes: settings, storage, the database session, the caller."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, AsyncIterator

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from latprune.service.auth import lookup_token
from latprune.service.db import engine_for
from latprune.service.settings import Settings
from latprune.service.storage import Storage, checked_device
from latprune.service.schemas import ErrorOut

ID_PATTERN = re.compile(r"^[a-z]{3}_[0-9a-f]{20}$")  # service.storage's id pattern


class ApiError(HTTPException):
    """An HTTP error with an optional list of details (validation problems) in the JSON body."""

    def __init__(self, status_code: int, message: str, details: list[Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.details = details


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    storage = getattr(request.app.state, "storage", None)
    if storage is None:  # the app's lifespan did not run (e.g. a TestClient outside `with`)
        storage = request.app.state.storage = Storage(request.app.state.settings.data_path)
    return storage


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session per request. Async on purpose: creating one does no I/O (the connection is
    checked out at its first query, in the route's thread) and closing one only returns the
    connection to the pool, so no threadpool round trip is spent on either (a sync generator
    costs two per request; about 8% of a job-status request under load, bench/service.py)."""
    _, factory = engine_for(request.app.state.settings.db_url)
    session = factory()
    try:
        yield session
    finally:
        session.close()


bearer = HTTPBearer(auto_error=False, description="an API token (`latprune token create`)")


@dataclass(frozen=True)
class Caller:
    user_id: str
    user_name: str
    token_id: str
    role: str  # user | agent


def current_caller(request: Request, session: Annotated[Session, Depends(get_session)],
                   creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    if creds is None or not creds.credentials:
        raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    found = lookup_token(session, creds.credentials)
    if found is None or found[0] is None:
        raise ApiError(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    user, token = found
    caller = Caller(user_id=user.id, user_name=user.name, token_id=token.id, role=token.role)
    request.state.caller = caller
    return caller


def require_agent(caller: Annotated[Caller, Depends(current_caller)]) -> Caller:
    if caller.role != "agent":
        raise ApiError(403, "this needs an agent token (latprune token create --role agent)")
    return caller


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SessionDep = Annotated[Session, Depends(get_session)]
CallerDep = Annotated[Caller, Depends(current_caller)]
AgentDep = Annotated[Caller, Depends(require_agent)]


def checked_id(value: str, what: str) -> str:
    """A service id from a path or body, or 404 (never a 500 from the storage layer)."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise not_found(what)
    return value


def device_name(value: str) -> str:
    try:
        return checked_device(value)
    except ValueError:
        raise not_found(f"device {value[:64]!r}") from None


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the JSON error bodies a route may answer with."""
    text = {400: "bad input", 401: "missing or invalid token", 403: "forbidden for this token's role",
            404: "not found (or not yours)", 409: "conflicts with the current state", 413: "body too large",
            422: "invalid parameters", 429: "rate limited (see Retry-After)", 503: "not ready"}
    return {c: {"model": ErrorOut, "description": text.get(c, "error")} for c in codes}
