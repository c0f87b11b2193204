"""Retrain readiness for admins: what a retrain would use now and what is missing.

One call, `training.readiness.check_readiness`, answers for every way in: the admin page, the HTTP
API (`GET /v1/admin/readiness`) and `assistant admin readiness`. This wrapper only adds the check of
who may ask (the counts describe every user's feedback).
"""

from __future__ import annotations

from typing import Any

from assistant.actions.base import Actor, require_admin
from assistant.config import Settings
from memory.store import Store
from training.readiness import check_readiness


def readiness(actor: Actor | None, store: Store, settings: Settings, knowledge: Any | None = None,
              build: dict[str, Any] | None = None) -> dict[str, Any]:
    require_admin(actor)
    return check_readiness(store, settings, build, knowledge=knowledge).to_dict()
