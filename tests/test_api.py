"""The OpenAI-compatible API, driven by the official `openai` client against a real server.

The server runs the tiny random model with two adapters; assertions are on the rows it stored.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest

from tests.helpers import ServerThread, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_adapters):
    home = tmp_path_factory.mktemp("api-home")
    srv = start_server(home, tiny_model_dir, tiny_adapters, max_message_chars=500, max_new_tokens=12)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alice(server: ServerThread):
    user = server.services.store.create_user("alice", "alice-password-1")
    key = server.services.store.create_api_key(user.id)
    return user, key


def client(server: ServerThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def counts(server: ServerThread) -> dict:
    return server.services.store.counts()


def test_health(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_models_lists_base_alias_and_adapters(server, alice):
    _, key = alice
    ids = [m.id for m in client(server, key).models.list().data]
    assert ids[0] == "assistant"
    assert server.services.backend.model_name in ids
    assert {"alpha", "beta"} <= set(ids)


def test_a_new_conversation_is_titled_from_its_first_question(server, alice):
    user, key = alice
    question = "Hi! Can you explain how refunds work for the Pro plan in Europe?"
    resp = client(server, key).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=4)
    cid = resp.model_extra["conversation_id"]
    assert server.services.store.get_conversation(cid, user.id).title == "Explain how refunds work for the Pro…"
    listed = httpx.get(server.url + "/v1/conversations", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert [c["title"] for c in listed if c["id"] == cid] == ["Explain how refunds work for the Pro…"]


def test_non_streaming_chat_is_logged(server, alice):
    user, key = alice
    resp = client(server, key).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Hello there"}], temperature=0, max_tokens=8)
    text = resp.choices[0].message.content
    assert text and resp.usage.completion_tokens > 0
    extra = resp.model_extra
    conv = server.services.store.get_conversation(extra["conversation_id"], user.id)
    assert conv is not None and conv.source == "api"
    msgs = server.services.store.messages(conv.id)
    assert [(m.role, m.content) for m in msgs] == [("user", "Hello there"), ("assistant", text)]
    assert msgs[1].adapter == "alpha"
    assert msgs[1].generation["temperature"] == 0 and msgs[1].generation["max_new_tokens"] == 8
    assert msgs[1].id == extra["message_id"]


def test_streaming_chat_matches_and_is_logged(server, alice):
    user, key = alice
    c = client(server, key)
    kwargs = dict(model="beta", messages=[{"role": "user", "content": "Tell me a story"}],
                  temperature=0, max_tokens=10)
    whole = c.chat.completions.create(**kwargs).choices[0].message.content
    pieces, last = [], None
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        last = chunk
    assert len(pieces) > 1, "the answer should arrive in several pieces"
    assert "".join(pieces) == whole
    assert last.choices[0].finish_reason in ("stop", "length")
    msgs = server.services.store.messages(last.model_extra["conversation_id"])
    assert msgs[-1].content == whole and msgs[-1].adapter == "beta"


def test_history_and_continuation_are_logged(server, alice):
    user, key = alice
    c = client(server, key)
    first = c.chat.completions.create(
        model="assistant", temperature=0, max_tokens=6,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}])
    cid = first.model_extra["conversation_id"]
    c.chat.completions.create(model="assistant", temperature=0, max_tokens=6,
                              messages=[{"role": "user", "content": "And now?"}],
                              extra_body={"conversation_id": cid})
    roles = [(m.role, m.content) for m in server.services.store.messages(cid)]
    assert roles[:3] == [("user", "Hi"), ("assistant", "Hello!"), ("user", "How are you?")]
    assert roles[4] == ("user", "And now?") and len(roles) == 6


def test_wrong_key_is_401_and_nothing_logged(server, alice):
    before = counts(server)
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-wrong").chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert counts(server) == before


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"model": "assistant", "messages": [{"role": "user", "content": ""}]}, 400, "invalid_request_error"),
        ({"model": "assistant", "messages": [{"role": "user", "content": "   \n\t "}]}, 400,
         "invalid_request_error"),
        ({"model": "assistant", "messages": [{"role": "user", "content": "x" * 501}]}, 413, "message_too_long"),
        ({"model": "no-such-adapter", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
        ({"model": "assistant", "messages": []}, 400, "invalid_request_error"),
        ({"model": "assistant", "messages": [{"role": "assistant", "content": "hi"}]}, 400,
         "invalid_request_error"),
        ({"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400,
         "invalid_request_error"),
        ({"model": "assistant", "messages": [{"role": "user", "content": "hi"}],
          "conversation_id": 999999}, 404, "not_found"),
    ],
)
def test_bad_input_is_a_clear_4xx_with_no_model_call(server, alice, body, status, code):
    _, key = alice
    before = counts(server)
    calls_before = server.calls
    r = httpx.post(server.url + "/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    assert server.calls == calls_before, "the model must not be called"
    assert counts(server) == before, "nothing may be written"


def test_malformed_json_is_400(server, alice):
    _, key = alice
    before, calls_before = counts(server), server.calls
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"\xff\xfe\x00binary", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500
    assert counts(server) == before and server.calls == calls_before


def test_sdk_raises_for_unknown_model(server, alice):
    _, key = alice
    with pytest.raises(openai.NotFoundError):
        client(server, key).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_concurrent_requests_on_two_adapters_match_solo_runs(server, alice):
    _, key = alice
    c = client(server, key)

    def ask(model: str, stream: bool) -> str:
        kwargs = dict(model=model, messages=[{"role": "user", "content": "Write about the sea"}],
                      temperature=0, max_tokens=12)
        if not stream:
            return c.chat.completions.create(**kwargs).choices[0].message.content
        return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kwargs)
                       if ch.choices)

    solo = {m: ask(m, False) for m in ("alpha", "beta")}
    assert solo["alpha"] != solo["beta"], "the two adapters must produce different text"
    with cf.ThreadPoolExecutor(6) as ex:
        jobs = [(m, ex.submit(ask, m, i % 2 == 0)) for i, m in enumerate(["alpha", "beta"] * 3)]
        for model, fut in jobs:
            assert fut.result() == solo[model]


def test_feedback_endpoints_and_isolation(server, alice):
    user, key = alice
    store = server.services.store
    bob = store.create_user("bob-api", "bob-password-1")
    bob_key = store.create_api_key(bob.id)
    resp = client(server, key).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Rate me"}], temperature=0, max_tokens=5)
    mid = resp.model_extra["message_id"]
    auth = {"Authorization": f"Bearer {key}"}
    bob_auth = {"Authorization": f"Bearer {bob_key}"}
    r = httpx.post(server.url + "/v1/feedback/thumb", json={"message_id": mid, "rating": -1, "reason": "wrong"},
                   headers=auth)
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/feedback/thumb", json={"message_id": mid, "rating": 1}, headers=bob_auth)
    assert r.status_code == 404
    r = httpx.post(server.url + "/v1/feedback/edit", json={"message_id": mid, "corrected": "mine"},
                   headers=bob_auth)
    assert r.status_code == 404
    r = httpx.get(server.url + f"/v1/conversations/{resp.model_extra['conversation_id']}", headers=bob_auth)
    assert r.status_code == 404
    assert all(c["id"] != resp.model_extra["conversation_id"]
               for c in httpx.get(server.url + "/v1/conversations", headers=bob_auth).json()["data"])
    r = httpx.post(server.url + "/v1/feedback/thumb", json={"message_id": mid, "rating": 1, "reason": "bogus"},
                   headers=auth)
    assert r.status_code == 400
    fb = store.feedback_for_message(mid)
    assert [(f.kind, f.rating, f.reason, f.user_id) for f in fb] == [("thumb", -1, "wrong", user.id)]
    r = httpx.post(server.url + "/v1/feedback/edit", json={"message_id": mid, "corrected": "A better answer."},
                   headers=auth)
    assert r.status_code == 200
    assert json.loads(json.dumps([f.corrected for f in store.feedback_for_message(mid)]))[-1] == "A better answer."


def test_a_client_that_leaves_mid_stream_stops_the_generation(server):
    store = server.services.store
    user = store.create_user("leaver", "leaver-password-1")
    key = store.create_api_key(user.id)
    body = {"model": "alpha", "stream": True, "max_tokens": 1000, "temperature": 0,
            "messages": [{"role": "user", "content": "Count to a thousand"}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # the first text arrived; leaving the block closes the connection
    deadline = time.monotonic() + 30
    msgs = []
    while time.monotonic() < deadline and len(msgs) < 2:
        convs = store.list_conversations(user.id)
        msgs = store.messages(convs[0].id) if convs else []
        time.sleep(0.05)
    assert [m.role for m in msgs] == ["user", "assistant"], "the stopped turn is logged"
    assert msgs[1].status == "stopped" and msgs[1].content
    # the model is free again: the next request is answered at once
    again = client(server, key).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
    assert again.choices[0].message.content
    assert server.services.chat.backend.queue_depth == 0


def test_choosing_through_the_api_marks_the_answers_as_the_page_does(server, alice):
    """One action for "this one is better": the pair is stored, the chosen answer is the one the
    conversation continues from and the other becomes an alternative, whichever front end asked."""
    user, key = alice
    store = server.services.store
    resp = client(server, key).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Pick me"}], temperature=0, max_tokens=4)
    mid = resp.model_extra["message_id"]
    alt = server.services.chat.regenerate(user, mid).drain().assistant_message.id
    r = httpx.post(server.url + "/v1/feedback/pair", headers={"Authorization": f"Bearer {key}"},
                   json={"message_id": mid, "other_message_id": alt, "chosen_message_id": alt})
    assert r.status_code == 200, r.text
    status = {m.id: m.status for m in store.messages(resp.model_extra["conversation_id"])}
    assert status[alt] == "complete" and status[mid] == "alternative"
    assert [f.kind for f in store.feedback_for_message(mid)] == ["pair"]
