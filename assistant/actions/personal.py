"""Personal adapters, for every way in: a user's own status, opt-in, report and "forget what you learned from me";
the admins' list of per-user adapters with their disk use, and a personal retrain started by an admin.

In: the `Services` and the acting `User` (or the `Operator` at the server's command line). Out: plain dicts.
The rules live here:

- A user reads and changes only their own personal adapter. Another user's version name or report reads as
  not found (404), whoever asks; an admin sees the list (state, versions, disk use) but not a user's report,
  whose answers come from that user's conversations.
- Opting in needs the installation's switch (`personal_adapters`); opting out stops serving at once.
- Only admins start a personal retrain by hand (the scheduler starts the rest); it is a retrain job like
  the shared one, one job at a time.

The work is `training.personal`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from assistant.actions.base import Actor, Conflict, NotFound, Operator, actor_name, require_admin, require_user
from memory.types import User
from training import personal
from training.jobs import JobBusy, runner_for
from training.loop import CycleOptions
from training.registry import UnknownVersion

if TYPE_CHECKING:
    from assistant.services import Services


class PersonalActions:
    def __init__(self, services: Services) -> None:
        self.services = services

    # ------------------------------------------------------------------ the user's own
    def status(self, user: User | None) -> dict[str, Any]:
        user = require_user(user)
        return personal.status(self.services, user.id)

    def set_opt_in(self, user: User | None, opted_in: bool) -> dict[str, Any]:
        user = require_user(user)
        if opted_in and not self.services.settings.personal_adapters:
            raise Conflict("personal adapters are off for this installation; an admin turns them on "
                           "(setting personal_adapters)")
        return personal.opt(self.services, user.id, bool(opted_in))

    def report(self, user: User | None, version: str | None = None) -> dict[str, Any]:
        user = require_user(user)
        try:
            return personal.report(self.services, user.id, version)
        except UnknownVersion as e:  # someone else's version reads exactly like a missing one
            raise NotFound(str(e)) from e

    def forget(self, user: User | None) -> dict[str, Any]:
        user = require_user(user)
        try:
            return {"user_id": user.id, "deleted": personal.forget(self.services, user.id)}
        except personal.PersonalError as e:
            raise Conflict(str(e)) from e

    # ------------------------------------------------------------------ admins
    def overview(self, actor: Actor | None) -> list[dict[str, Any]]:
        require_admin(actor)
        return personal.overview(self.services, self.services.store.list_users())

    def user_adapters(self, actor: Actor | None, user_id: int) -> dict[str, Any]:
        """One user's line and their versions (gate and reason, no report)."""
        require_admin(actor)
        u = self.services.store.get_user(user_id) if isinstance(user_id, int) else None
        if u is None:
            raise NotFound(f"user {user_id} not found")
        line = next(iter(personal.overview(self.services, [u])), None)
        if line is None:
            raise NotFound(f"user {u.username!r} has no personal adapter and has not opted in")
        st = personal.status(self.services, u.id)
        return {**line, "state": st["state"], "versions": st["versions"], "readiness": st["readiness"]}

    def train(self, actor: Actor | None, user_id: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start a personal retrain of `user_id` now (NotReady, a ValueError, says what is missing)."""
        actor = require_admin(actor)
        if self.services.store.get_user(user_id) is None:
            raise NotFound(f"user {user_id} not found")
        opts = CycleOptions.from_dict(personal.cycle_options(user_id, overrides))
        try:
            job = runner_for(self.services).start(opts, requested_by=actor_name(actor),
                                                  trigger="cli" if isinstance(actor, Operator) else "manual")
        except JobBusy as e:
            raise Conflict(str(e)) from e
        return job.to_dict()


__all__ = ["PersonalActions"]
