"""What the guard does when a store it depends on stops answering.

The guard depends on two stores: the database (keys, blocks, decisions, forensic records) and,
with ``limits.redis_url``, Redis (shared rate limits and budgets). When one of them does not
answer, the guard **fails closed** by default: the request is refused with ``503``
(problem type ``dependency-unavailable``, ``Retry-After``), never answered unchecked. Two
switches, both off by default and both logged and counted when they take effect, let an
operator choose availability over control:

* ``limits.fail_open: true`` - the rate limit and the query budget are skipped while the
  rate-limit store is down (an attacker gets unlimited queries for that time);
* ``forensics.fail_open: true`` - the answer is sent even when its decision record could not
  be written (the record is lost).

Authentication always fails closed: a guard that cannot read its keys cannot tell a client
from an attacker (a client's key and block rows read less than ``auth.cache_ttl_s`` ago serve
until then: :mod:`advguard.guard.controlcache`). Nothing else is cached, so the guard recovers
by itself when the store answers again (SQLAlchemy's pool pre-ping for PostgreSQL, redis-py
reconnecting).
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError, OperationalError

from advguard.guard.problems import Problem

log = logging.getLogger("advguard.guard")

#: Seconds a client is told to wait before retrying a request refused for an outage.
RETRY_AFTER_S = 5


def _dependency_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, OperationalError, DBAPIError]
    try:
        from limits.errors import StorageError

        errors.append(StorageError)
    except ImportError:  # pragma: no cover - limits is a dependency of the guard extra
        pass
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        errors += [RedisConnectionError, RedisTimeoutError]
    except ImportError:  # redis is only needed with limits.redis_url
        pass
    return tuple(errors)


#: Exceptions that mean "the store did not answer" (not "the request is bad").
DEPENDENCY_ERRORS = _dependency_errors()


def unavailable(store: str) -> Problem:
    """The 503 problem for an outage of ``store`` ("database" or "rate-limit store")."""
    return Problem(
        "dependency-unavailable",
        f"the guard's {store} does not answer; try again later",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def note_fail_open(store: str, what: str, exc: BaseException) -> None:
    """Log (type only: a message could quote a URL with a password) that a check was skipped."""
    log.warning("%s unavailable (%s): %s skipped (fail_open)", store, type(exc).__name__, what)
