"""First run and accounts in the page: /setup makes the first admin, admins add people, users change
their password. Over real HTTP against a real server (tiny model) and the real store."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.helpers import start_server
from ui import people
from ui.firstrun import FirstRun
from ui.handlers import UiError


@pytest.fixture
def fresh(tmp_path, tiny_model_dir):
    srv = start_server(tmp_path / "home", tiny_model_dir, with_ui=True, max_new_tokens=4)
    yield srv
    srv.stop()


def _nonce(page: str) -> str:
    return re.search(r'name="nonce" value="([^"]+)"', page).group(1)


def test_the_first_admin_is_made_in_the_browser_then_the_form_is_gone(fresh) -> None:
    store = fresh.services.store
    with httpx.Client(base_url=fresh.url, follow_redirects=False, timeout=30) as c:
        assert c.get("/").headers["location"] == "/setup"  # the page sends a fresh install to the form
        form = c.get("/setup")
        assert form.status_code == 200 and "Create the administrator" in form.text
        bad = c.post("/setup", data={"nonce": _nonce(form.text), "username": "ada", "password": "short",
                                     "again": "short"})
        assert "at least 8 characters" in bad.text and store.list_users() == []
        again = c.post("/setup", data={"nonce": _nonce(bad.text), "username": "ada", "password": "long-enough-1",
                                       "again": "long-enough-2"})
        assert "not the same" in again.text and store.list_users() == []
        forged = c.post("/setup", data={"nonce": "made-up", "username": "eve", "password": "long-enough-1",
                                        "again": "long-enough-1"})
        assert "expired" in forged.text and store.list_users() == []
        ok = c.post("/setup", data={"nonce": _nonce(again.text), "username": "ada", "password": "long-enough-1",
                                    "again": "long-enough-1"})
        assert ok.status_code == 200 and "The administrator <b>ada</b>" in ok.text
        [ada] = store.list_users()
        assert ada.username == "ada" and ada.is_admin
        assert store.authenticate("ada", "long-enough-1") is not None
        assert c.get("/setup").status_code == 404  # one first admin only
        assert c.post("/setup", data={"nonce": _nonce(form.text), "username": "eve", "password": "long-enough-1",
                                      "again": "long-enough-1"}).status_code == 404
        assert c.get("/").headers.get("location") != "/setup"
    assert [u.username for u in store.list_users()] == ["ada"]


def test_only_loopback_or_the_setup_link_may_make_the_first_admin(fresh) -> None:
    wide = fresh.services.settings.model_copy(update={"host": "0.0.0.0"})
    fr = FirstRun(fresh.services.store, wide)
    assert not fr.allowed("127.0.0.1", None)  # the server is reachable from elsewhere: the link is needed
    assert not fr.allowed("10.1.2.3", "wrong")
    assert fr.allowed("10.1.2.3", fr.token) and fr.token in fr.link()
    local = FirstRun(fresh.services.store, fresh.services.settings)
    assert local.allowed("127.0.0.1", None) and not local.allowed("10.1.2.3", None)


def test_admins_add_people_and_people_change_their_password(fresh) -> None:
    s = fresh.services
    root = s.store.create_user("root", "root-pass-1", role="admin")
    bob = s.store.create_user("bob", "bob-pass-1")
    note = people.add_person(s, root, "carol", "carol-pass-1", "carol-pass-1", False)
    carol = s.store.get_user_by_name("carol")
    assert carol is not None and carol.role == "user" and "API key" in note
    assert s.store.authenticate("carol", "carol-pass-1") is not None
    with pytest.raises(UiError, match="needs an admin"):
        people.add_person(s, bob, "mallory", "mallory-pass", "mallory-pass", True)
    with pytest.raises(UiError, match="not the same"):
        people.add_person(s, root, "dave", "dave-pass-1", "dave-pass-2", False)
    assert s.store.get_user_by_name("mallory") is None and s.store.get_user_by_name("dave") is None
    assert list(people.people_frame(s, root)["name"]) == ["root", "bob", "carol"]

    with pytest.raises(UiError, match="current password is not right"):
        people.change_own_password(s, bob, "wrong", "bob-pass-2", "bob-pass-2")
    people.change_own_password(s, bob, "bob-pass-1", "bob-new-pass", "bob-new-pass")
    assert s.store.authenticate("bob", "bob-new-pass") is not None
    assert s.store.authenticate("bob", "bob-pass-1") is None
