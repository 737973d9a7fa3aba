"""How a platform loop that retries a failed step says so.

The dispatcher's claim, lease and result loops and the cancel watcher's poll run on their own threads for
as long as the process serves. A step that fails is retried, whatever failed: a thread that died on an
unexpected error left the worker holding runs it would never finish, or never stopping runs a user
cancelled, with nothing in the log at the moment it happened.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa


def log_retry(logger: logging.Logger, exc: Exception, what: str, then: str = "retrying") -> None:
    """A database error as a warning naming its kind (the store is down or busy: expected, and
    retried); anything else with its traceback (a bug, which must still not end the loop's thread)."""
    say = logger.warning if isinstance(exc, sa.exc.SQLAlchemyError) else logger.exception
    say("%s failed (%s); %s", what, exc.__class__.__name__, then)
