"""A user's own account: change one's password.

In: the store, the acting `User`, the current password and the new one. Out: nothing, or an error
from `assistant.actions.base` / ValueError. The same rule as an admin's reset
(`assistant.actions.users.check_password`), and the change is written to the audit log with the user
as the actor.
"""

from __future__ import annotations

from assistant.actions.base import require_user
from assistant.actions.users import check_password
from memory.store import Store
from memory.types import User


def change_password(store: Store, user: User | None, current: str, new: str) -> None:
    """Replace the user's password once the current one is confirmed; sessions and API keys stay valid."""
    user = require_user(user)
    new = check_password(new)
    if store.authenticate(user.username, current if isinstance(current, str) else "") is None:
        raise ValueError("the current password is not right")
    store.set_password(user.id, new)
    store.record_audit(user.username, "user_password", user.id, user.username, {"by": "self"})
