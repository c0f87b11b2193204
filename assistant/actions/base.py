"""Errors every action raises, and the checks of who may act.

The ways in map them to their own words: the API to status codes (401, 403, 404, 409, 413, 400), the
CLI to exit codes, the page to a message. An action raises before it changes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from memory.types import User


class LoginRequired(PermissionError):
    """No logged-in user."""


class AdminRequired(PermissionError):
    """A logged-in user who is not an admin."""


class NotFound(LookupError):
    """No such thing among those the actor may see (another user's looks exactly like a missing one)."""


class Conflict(ValueError):
    """The action contradicts what is stored (a duplicate document, the last admin, oneself)."""


class TooLarge(ValueError):
    """An upload over a configured limit."""


@dataclass(frozen=True)
class Operator:
    """Whoever runs the `assistant` command on the server: they own its files, so they act as an admin.

    `name` is recorded in the audit log (`cli:<os user>`).
    """

    name: str


Actor = User | Operator


def require_user(user: User | None) -> User:
    if user is None:
        raise LoginRequired("log in first")
    return user


def require_admin(actor: Actor | None) -> Actor:
    """The actor when it is an admin (or the operator); LoginRequired / AdminRequired otherwise."""
    if isinstance(actor, Operator):
        return actor
    user = require_user(actor)
    if not user.is_admin:
        raise AdminRequired("this needs an admin account")
    return user


def actor_name(actor: Actor) -> str:
    return actor.name if isinstance(actor, Operator) else actor.username
