"""API tokens (hashed at rest) and per-token rate limits.

A token is `lp_` + 43 URL-safe characters (256 random bits). The database keeps its SHA-256
only; the plain token is shown once, by `latprune token create`.
"""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import defaultdict, deque

from sqlalchemy import select
from sqlalchemy.orm import Session

from latprune.service.db import Token, User, get_or_create_user

TOKEN_PREFIX = "lp_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, user_name: str, role: str = "user") -> str:
    """Create a token for `user_name` (the user is created if new). Returns the plain token."""
    if role not in ("user", "agent"):
        raise ValueError(f"role must be user or agent, not {role!r}")
    user = get_or_create_user(session, user_name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(Token(user_id=user.id, sha256=hash_token(token), prefix=token[:10], role=role))
    session.flush()
    return token


def lookup_token(session: Session, token: str) -> tuple[User, Token] | None:
    """The user and token row of a presented token, or None (unknown or revoked)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = session.scalar(select(Token).where(Token.sha256 == hash_token(token), Token.revoked.is_(False)))
    if row is None:
        return None
    return session.get(User, row.user_id), row


def revoke_token(session: Session, prefix_or_id: str) -> int:
    rows = session.scalars(select(Token).where((Token.id == prefix_or_id) | (Token.prefix == prefix_or_id))).all()
    for row in rows:
        row.revoked = True
    return len(rows)


class RateLimiter:
    """Sliding one-minute window per key (a token id). In-process: with several API processes
    each enforces its own window."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, key: str) -> float:
        """Record a hit; returns 0 when allowed, else the seconds until the next slot."""
        t = time.monotonic()
        with self._lock:
            hits = self._hits[key]
            while hits and t - hits[0] >= 60.0:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return 60.0 - (t - hits[0])
            hits.append(t)
            return 0.0
