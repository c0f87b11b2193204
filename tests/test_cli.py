"""The `assistant` command, run in-process through typer's runner, asserting on stored rows."""

from __future__ import annotations

from typer.testing import CliRunner

from assistant.cli import app
from memory.store import Store

runner = CliRunner()


def run(home, *args, env=None, input=None):
    result = runner.invoke(app, [*args], env={"ASSISTANT_HOME": str(home), **(env or {})}, input=input)
    return result


def test_user_add_creates_user_with_role_and_working_key(home):
    r = run(home, "user", "add", "root", "--admin", "--password", "a-long-password")
    assert r.exit_code == 0, r.output
    key = r.output.strip().splitlines()[-1].split(": ")[-1]
    store = Store.open(f"sqlite:///{home / 'assistant.db'}")
    user = store.get_user_by_name("root")
    assert user is not None and user.role == "admin"
    assert store.user_for_api_key(key) == user
    assert store.authenticate("root", "a-long-password") == user

    r = run(home, "user", "add", "root", "--password", "another-password")
    assert r.exit_code == 2 and "error" in r.output
    r = run(home, "user", "add", "plain", "--password", "pw-plain-123")
    assert r.exit_code == 0
    assert store.get_user_by_name("plain").role == "user"
    r = run(home, "user", "list")
    assert "root\tadmin" in r.output and "plain\tuser" in r.output
    r = run(home, "user", "key", "plain")
    assert r.exit_code == 0 and store.user_for_api_key(r.output.strip()).username == "plain"
    r = run(home, "user", "key", "nobody")
    assert r.exit_code == 2


def test_password_prompt_must_match(home):
    r = run(home, "user", "add", "carol", input="one-password\nother-password\n")
    assert r.exit_code == 2 and "differ" in r.output
    assert Store.open(f"sqlite:///{home / 'assistant.db'}").get_user_by_name("carol") is None


def test_bad_settings_are_a_clear_error(home):
    r = run(home, "user", "list", env={"ASSISTANT_NOT_A_SETTING": "1"})
    assert r.exit_code == 2 and "ASSISTANT_NOT_A_SETTING" in r.output


def test_terminal_chat_is_logged(home, tiny_model_dir):
    env = {"ASSISTANT_MODEL": str(tiny_model_dir), "ASSISTANT_MAX_NEW_TOKENS": "6", "ASSISTANT_TEMPERATURE": "0"}
    assert run(home, "user", "add", "dora", "--password", "pw-dora-123").exit_code == 0
    r = run(home, "chat", "--user", "dora", env=env, input="Hello there\n   \nSecond question\n/quit\n")
    assert r.exit_code == 0, r.output
    store = Store.open(f"sqlite:///{home / 'assistant.db'}")
    dora = store.get_user_by_name("dora")
    convs = store.list_conversations(dora.id)
    assert len(convs) == 1 and convs[0].source == "cli"
    msgs = store.messages(convs[0].id)
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0].content == "Hello there" and msgs[2].content == "Second question"
    assert msgs[1].content in r.output
