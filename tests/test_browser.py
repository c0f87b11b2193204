"""The page in a real headless browser (Debian's chromium driven by selenium through the system
chromedriver; nothing downloads a browser), against a real server on the tiny random model.

One walk through what a user does: log in, send a message (with an HTML/script payload) and watch
the answer stream in, thumbs-down with a reason, correct an answer, regenerate and choose, reload
and find the conversation. Then the rows the server stored are checked, and screenshots of the chat
page and the feedback controls are written to docs/ (docs/chat.png, docs/feedback.png, docs/login.png)
by the same walk on the real embedded model (marked slow), so the pictures show real answers.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerThread, start_server

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parent.parent / "docs"
# Pictures for docs/ go to this folder (`make screenshots` sets it and copies them into docs/); a test
# never writes a tracked file.
SHOTS_ENV = "ASSISTANT_SCREENSHOTS"
PHONE = (390, 844)
DESKTOP = (1280, 1000)
PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> What is **LoRA**?'
TIMEOUT = 60

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_adapters):
    srv = start_server(tmp_path_factory.mktemp("browser-home"), tiny_model_dir, tiny_adapters, with_ui=True,
                       max_new_tokens=48, max_message_chars=2000)
    srv.services.chat.set_serving("alpha")  # so every stored answer names a real adapter version
    srv.services.store.create_user("alice", "alice-pass-1")
    yield srv
    srv.stop()


@pytest.fixture
def browser(tmp_path):
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never try to fetch a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def wait_for(driver, condition: Callable[[Any], Any], what: str, timeout: float = TIMEOUT) -> Any:
    try:
        # A redrawn element (the page relabels its tabs after a load or a language switch) is looked up again.
        return WebDriverWait(driver, timeout, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        page = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"timed out waiting for {what}; the page ends with:\n{page[-1500:]}") from None


def eventually(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll the server's store (not the page) until `check` returns something truthy."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def css(driver, selector: str):
    return wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, selector), selector)


def text_of(driver, selector: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, selector).text


def click(driver, selector: str) -> None:
    el = wait_for(driver, lambda d: (e := d.find_element(By.CSS_SELECTOR, selector)).is_enabled() and e,
                  f"{selector} clickable")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    el.click()


def pick(driver, dropdown: str, value: str) -> None:
    """Choose `value` in a Gradio dropdown (an input with a list of options)."""
    box = css(driver, f"{dropdown} input")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    option = wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, f'{dropdown} li[aria-label="{value}"]'),
                      f"option {value}")
    option.click()
    wait_for(driver, lambda d: box.get_attribute("value") == value, f"{dropdown} = {value}")


def shots_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ[SHOTS_ENV]) if os.environ.get(SHOTS_ENV) else tmp_path / "shots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(driver, folder: Path, name: str) -> None:
    """`<name>.png` at desktop width and `<name>-phone.png` at phone width."""
    driver.save_screenshot(str(folder / f"{name}.png"))
    driver.set_window_size(*PHONE)
    time.sleep(0.5)  # the layout settles
    driver.save_screenshot(str(folder / f"{name}-phone.png"))
    driver.set_window_size(*DESKTOP)
    time.sleep(0.3)


def bot_texts(driver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")]


def _words(text: str) -> list[str]:
    return [w for w in re.sub(r"[^\w]+", " ", text).lower().split() if len(w) >= 3]


def shows(page_text: str, stored: str) -> bool:
    """Whether the page shows the stored text. Markdown rendering drops list numbers, asterisks and
    the like, and a random model writes anything, so compare the words, not the characters."""
    want, have = _words(stored), set(_words(page_text))
    return bool(want) and sum(w in have for w in want) >= 0.8 * len(want)


def answer_shown(driver, stored: str) -> bool:
    return any(shows(t, stored) for t in bot_texts(driver))


def login(driver, url: str, username: str, password: str) -> None:
    driver.get(url)
    css(driver, "input[type=password]")
    driver.find_element(By.CSS_SELECTOR, "input[type=text]").send_keys(username)
    driver.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(password, Keys.ENTER)
    css(driver, "#message textarea")
    wait_for(driver, lambda d: username in text_of(d, "#whoami"), "the signed-in header")


def test_chat_feedback_regenerate_reload(server: ServerThread, browser, tmp_path):
    d, store, url = browser, server.services.store, server.url
    shots = tmp_path  # the tiny model writes gibberish; docs/ gets the embedded model's pictures
    alice = store.get_user_by_name("alice")

    # ---- login page: nothing of the app before logging in
    d.get(url)
    css(d, "input[type=password]")
    assert not d.find_elements(By.CSS_SELECTOR, "#chatbot")
    d.save_screenshot(str(shots / "login.png"))
    login(d, url, "alice", "alice-pass-1")

    # ---- send a message; watch the answer stream in (partial states carry the ▌ cursor)
    d.execute_script("""
        window.__partials = new Set();
        new MutationObserver(() => {
          for (const e of document.querySelectorAll('#chatbot [data-testid=bot]'))
            if (e.textContent.includes('▌')) window.__partials.add(e.textContent.length);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});""")
    box = css(d, "#message textarea")
    box.send_keys(PAYLOAD)
    click(d, "#send")
    conv = eventually(lambda: store.list_conversations(alice.id), "the conversation to be stored")[0]
    answer = eventually(lambda: [m for m in store.messages(conv.id) if m.role == "assistant"],
                        "the answer to be stored")[0]
    wait_for(d, lambda d: answer_shown(d, answer.content), "the final answer")
    assert d.execute_script("return window.__partials.size") >= 2, "the answer did not stream"
    assert not any("▌" in t for t in bot_texts(d))
    assert box.get_attribute("value") == ""
    # the HTML was shown as text and nothing in it ran
    user_bubble = css(d, "#chatbot [data-testid=user]")
    assert "<script>window.__pwned=1</script>" in user_bubble.text
    assert "LoRA" in user_bubble.find_element(By.TAG_NAME, "strong").text  # Markdown still renders
    assert d.execute_script("return window.__pwned") is None
    assert not d.find_elements(By.CSS_SELECTOR, "#chatbot script, #chatbot img[src=x]")
    assert store.messages(conv.id)[0].content == PAYLOAD
    assert answer.adapter == "alpha"

    # "how this was answered" opens under the answer
    d.find_element(By.CSS_SELECTOR, "#chatbot .thought-group .title").click()
    wait_for(d, lambda d: "Adapter: alpha" in text_of(d, "#chatbot"), "the details to open")
    d.save_screenshot(str(shots / "chat.png"))

    # ---- thumbs-down on the answer, then add a reason and a comment
    dislike = d.find_elements(By.CSS_SELECTOR, '#chatbot button[aria-label="Dislike"]')[-1]
    dislike.click()
    thumb = eventually(lambda: [f for f in store.feedback_for_message(answer.id) if f.kind == "thumb"],
                       "the thumb to be stored")[0]
    assert (thumb.rating, thumb.reason) == (-1, None)
    css(d, "#feedback-popup")  # the thumb opens a small popup for a reason and a comment
    pick(d, "#reason", "wrong")
    css(d, "#comment textarea").send_keys("LoRA is a fine-tuning method, not a radio protocol.")
    click(d, "#feedback-save")
    thumb = eventually(lambda: [f for f in store.feedback_for_message(answer.id)
                                if f.kind == "thumb" and f.reason == "wrong"], "the reason to be stored")[0]
    wait_for(d, lambda d: "saved with your reason" in text_of(d, "#notice"), "the saved notice")
    wait_for(d, lambda d: not d.find_elements(By.CSS_SELECTOR, "#feedback-popup #reason"), "the popup to close")
    d.refresh()  # the thumb is shown again after a reload
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, '#chatbot button[aria-label="Disliked"]'),
             "the thumbs-down restored")

    # ---- correct the answer
    click(d, "#edit-accordion button")
    edit = css(d, "#edit-box textarea")
    wait_for(d, lambda d: shows(edit.get_attribute("value"), answer.content), "the answer in the edit box")
    edit.clear()
    edit.send_keys("LoRA trains small low-rank matrices beside frozen weights.")
    click(d, "#save-edit")
    edit_fb = eventually(lambda: [f for f in store.feedback_for_message(answer.id) if f.kind == "edit"],
                         "the correction to be stored")[0]
    wait_for(d, lambda d: "Correction saved" in text_of(d, "#notice"), "the correction notice")

    # ---- regenerate and choose
    click(d, "#regenerate")
    css(d, "#compare")
    wait_for(d, lambda d: d.find_element(By.CSS_SELECTOR, "#cmp-keep").is_enabled(), "the second answer")
    alternative = eventually(lambda: [m for m in store.messages(conv.id) if m.status == "alternative"],
                             "the alternative to be stored")[0]
    assert answer_shown(d, alternative.content) and "‹ 2/2 ›" in text_of(d, "#chatbot")
    d.execute_script("arguments[0].scrollIntoView({block: 'start'});", css(d, "#message"))
    d.save_screenshot(str(shots / "feedback.png"))
    click(d, "#cmp-keep")
    pair = eventually(lambda: [f for f in store.feedback_for_message(answer.id) if f.kind == "pair"],
                      "the choice to be stored")[0]
    wait_for(d, lambda d: "you kept the new answer" in text_of(d, "#notice"), "the choice notice")

    # ---- reload: the conversation is in the sidebar and shows the chosen answer
    d.refresh()
    css(d, "#message textarea")
    wait_for(d, lambda d: conv.title[:20] in text_of(d, "#conversations"), "the conversation in the list")
    wait_for(d, lambda d: answer_shown(d, alternative.content), "the chosen answer")
    assert not d.find_elements(By.CSS_SELECTOR, '#chatbot button[aria-label="Disliked"]')  # B was not rated
    assert d.execute_script("return window.__pwned") is None

    # ---- search the conversations, export one, and switch to dark mode (kept after a reload)
    search = css(d, "#conv-search textarea, #conv-search input")
    search.send_keys("zzqx-nowhere")
    wait_for(d, lambda d: conv.title[:20] not in text_of(d, "#conversations"), "no match")
    search.clear()
    search.send_keys("lora")  # not in the title: found in the question's words
    wait_for(d, lambda d: conv.title[:20] in text_of(d, "#conversations"), "the match by its words")
    click(d, "#manage button")
    click(d, "#export")
    wait_for(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#export-files a")) == 2, "the export files")
    names = re.sub(r"\s+", "", css(d, "#export-files").get_attribute("textContent"))  # shown cut short
    assert f"conversation-{conv.id}.md" in names and f"conversation-{conv.id}.json" in names, names
    exported = d.execute_async_script("""const done = arguments[0];
        const a = [...document.querySelectorAll('#export-files a')].find(a => a.href.includes('.md'));
        fetch(a.href).then(r => r.text()).then(done, e => done('failed: ' + e));""")
    assert exported.startswith("# ") and "What is **LoRA**?" in exported and alternative.content in exported
    click(d, "#theme-toggle")
    assert d.execute_script("return document.body.classList.contains('dark')")
    d.refresh()
    css(d, "#message textarea")
    wait_for(d, lambda d: d.execute_script("return document.body.classList.contains('dark')"), "dark after reload")

    # ---- the page loaded nothing from any other host
    resources = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    elsewhere = [r for r in resources if not r.startswith((url, "data:", "blob:"))]
    assert resources and elsewhere == []

    # ---- the stored rows: each piece of feedback names the exact message and its adapter
    messages = {m.id: m for m in store.messages(conv.id)}
    assert (thumb.user_id, thumb.message_id, thumb.rating, thumb.comment) == (
        alice.id, answer.id, -1, "LoRA is a fine-tuning method, not a radio protocol.")
    assert (edit_fb.message_id, edit_fb.corrected) == (
        answer.id, "LoRA trains small low-rank matrices beside frozen weights.")
    assert (pair.message_id, pair.other_message_id, pair.chosen_message_id) == (
        answer.id, alternative.id, alternative.id)
    assert messages[answer.id].adapter == "alpha" and messages[alternative.id].adapter == "alpha"
    assert messages[alternative.id].status == "complete" and messages[answer.id].status == "alternative"
    assert messages[alternative.id].parent_id == messages[answer.id].parent_id
    counts = store.counts()
    assert (counts["thumbs_down"], counts["edits"], counts["pairs"], counts["conversations"]) == (1, 1, 1, 1)


def test_long_and_empty_messages_send_nothing(server: ServerThread, browser):
    d, store = browser, server.services.store
    store.create_user("bob", "bob-pass-1")
    bob = store.get_user_by_name("bob")
    login(d, server.url, "bob", "bob-pass-1")
    calls = server.calls
    click(d, "#send")  # empty
    box = css(d, "#message textarea")
    long_text = "word " * 500  # 2500 characters, over the 2000 limit
    d.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));",
                     box, long_text)
    click(d, "#send")
    wait_for(d, lambda d: "the limit is 2000" in text_of(d, "#notice"), "the too-long notice")
    assert box.get_attribute("value") == long_text  # the text is kept, not lost
    assert server.calls == calls and store.list_conversations(bob.id) == []


@pytest.fixture
def stop_server(tmp_path, tiny_model_dir):
    # The tiny model's 2,048-token context is a few seconds of generating: on a loaded machine the answer could
    # end before the stop click lands. The same weights with a long context keep it going for minutes.
    import json

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "long-context-model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 65536}))
    srv = start_server(tmp_path / "stop-home", model, with_ui=True, max_new_tokens=60000,
                       max_tokens_limit=60000)
    srv.services.store.create_user("carol", "carol-pass-1")
    yield srv
    srv.stop()


def test_stop_button_ends_the_answer(stop_server: ServerThread, browser):
    d, store = browser, stop_server.services.store
    carol = store.get_user_by_name("carol")
    login(d, stop_server.url, "carol", "carol-pass-1")
    css(d, "#message textarea").send_keys("Please talk for a very long time.")
    # the answer bubble shows animated typing dots until its first token (they are gone within ms here:
    # an observer notes them as they appear)
    d.execute_script("""window.typingDots = null;
      new MutationObserver(() => { const e = document.querySelector('#chatbot .typing-dots');
        if (e && !window.typingDots) window.typingDots = [e.querySelectorAll('i').length,
          getComputedStyle(e.querySelector('i')).animationName]; })
        .observe(document.querySelector('#chatbot'), {childList: true, subtree: true});""")
    click(d, "#send")
    wait_for(d, lambda d: any("▌" in t for t in bot_texts(d)), "the answer to start streaming")
    assert d.execute_script("return window.typingDots") == [3, "typing-dot"]
    click(d, "#stop")
    answer = eventually(lambda: [m for c in store.list_conversations(carol.id) for m in store.messages(c.id)
                                 if m.role == "assistant"], "the stopped answer to be stored")[0]
    assert answer.status == "stopped" and answer.content.strip()
    wait_for(d, lambda d: not any("▌" in t for t in bot_texts(d)), "the page to show the stopped answer")
    assert answer_shown(d, answer.content)

    # rename, then delete (two clicks) from the sidebar
    cid = answer.conversation_id
    click(d, "#manage button")  # open the accordion
    css(d, "#title-box textarea").send_keys("Long talk")
    click(d, "#rename")
    eventually(lambda: store.get_conversation(cid, carol.id).title == "Long talk", "the new title")
    wait_for(d, lambda d: "Long talk" in text_of(d, "#conversations"), "the new title in the list")
    click(d, "#delete")
    assert store.get_conversation(cid, carol.id) is not None  # the first click only asks
    click(d, "#delete-confirm")
    eventually(lambda: store.get_conversation(cid, carol.id) is None, "the conversation to be deleted")
    wait_for(d, lambda d: "Long talk" not in text_of(d, "#conversations"), "the list without it")
    assert bot_texts(d) == []


# ------------------------------------------------------------------------------ pictures for docs/
@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory):
    """The real SmolLM2 with an adapter version "v1" serving (zero-initialised LoRA: answers unchanged)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from assistant.config import Settings
    from assistant.models import prepare_model

    root = tmp_path_factory.mktemp("embedded")
    model_dir = prepare_model(Settings.load(env={}, home=root / "cache"), progress=False)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(
        root / "v1")
    srv = start_server(root / "home", model_dir, {"v1": root / "v1"}, with_ui=True, max_new_tokens=60)
    srv.services.chat.set_serving("v1")
    srv.services.store.create_user("alice", "alice-pass-1")
    yield srv
    srv.stop()


@pytest.mark.slow
def test_screenshots_for_the_docs_on_the_embedded_model(embedded_server: ServerThread, browser, tmp_path):
    d, store, url = browser, embedded_server.services.store, embedded_server.url
    alice = store.get_user_by_name("alice")
    shots = shots_dir(tmp_path)
    d.get(url)
    css(d, "input[type=password]")
    screenshot(d, shots, "login")
    login(d, url, "alice", "alice-pass-1")

    css(d, "#message textarea").send_keys("Give me one tip for a first visit to Paris.")
    click(d, "#send")
    answer = eventually(lambda: [m for c in store.list_conversations(alice.id) for m in store.messages(c.id)
                                 if m.role == "assistant"], "the answer", timeout=120)[0]
    assert answer.adapter == "v1" and answer.content.strip()
    wait_for(d, lambda d: answer_shown(d, answer.content), "the answer on the page")
    d.find_element(By.CSS_SELECTOR, "#chatbot .thought-group .title").click()
    wait_for(d, lambda d: "Adapter: v1" in text_of(d, "#chatbot"), "the details to open")
    d.execute_script("window.scrollTo(0, 0)")
    screenshot(d, shots, "chat")

    d.find_elements(By.CSS_SELECTOR, '#chatbot button[aria-label="Dislike"]')[-1].click()
    css(d, "#feedback-popup")
    pick(d, "#reason", "unhelpful")
    css(d, "#comment textarea").send_keys("Too vague: name a place to start.")
    click(d, "#regenerate")
    wait_for(d, lambda d: d.find_element(By.CSS_SELECTOR, "#cmp-keep").is_enabled(), "the second answer",
             timeout=120)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", css(d, "#compare"))
    screenshot(d, shots, "feedback")
    thumb = [f for f in store.feedback_for_message(answer.id) if f.kind == "thumb"]
    assert [(f.rating, f.message_id) for f in thumb] == [(-1, answer.id)]


# ------------------------------------------------------------------------------ documents and memory
@pytest.fixture
def agent_server(tmp_path, tiny_model_dir):
    srv = start_server(tmp_path / "agent-home", tiny_model_dir, with_ui=True, with_agent=True, max_new_tokens=16)
    # Open chromadb and load the embedder before any page does: KnowledgeBase's lazy start-up is not
    # safe against two first requests at once (two PersistentClients race inside chromadb).
    srv.services.knowledge.warm()
    srv.services.store.create_user("dana", "dana-pass-1")
    yield srv
    srv.stop()


def open_tab(driver, name: str) -> None:
    def click(d: Any) -> bool:  # found and clicked in one go, so a tab redrawn in between is found again
        tabs = [b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name]
        if tabs:
            tabs[0].click()
        return bool(tabs)
    wait_for(driver, click, f"the {name} tab")


@pytest.mark.slow  # the real MiniLM embedder
def test_documents_and_memory_pages(agent_server: ServerThread, browser, tmp_path):
    d, services = browser, agent_server.services
    store, kb, lt = services.store, services.knowledge, services.memories
    dana = store.get_user_by_name("dana")
    login(d, agent_server.url, "dana", "dana-pass-1")
    assert not [b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == "Admin"]

    # ---- upload a document (its heading carries HTML, which must show as text)
    doc = tmp_path / "pump.md"
    doc.write_text("# <b>Pump</b> manual\n\nThe Zephyr-7 pump restarts after pressing the blue reset key twice.\n")
    open_tab(d, "Documents")
    css(d, "#doc-files input[type=file]").send_keys(str(doc))
    wait_for(d, lambda d: "pump" in text_of(d, "#doc-files"), "the file to reach the server")
    click(d, "#doc-upload")
    wait_for(d, lambda d: "added as" in text_of(d, "#doc-status"), "the upload report")
    wait_for(d, lambda d: "<b>Pump</b> manual" in text_of(d, "#doc-table"), "the document in the list")
    assert not d.find_elements(By.CSS_SELECTOR, "#doc-table b")
    [info] = kb.list_documents(dana)
    assert (info.filename, info.scope, info.owner_id) == ("pump.md", "private", dana.id)
    screenshot(d, shots_dir(tmp_path), "documents")

    # ---- an answer that used it says so under "how this was answered"
    open_tab(d, "Chat")
    css(d, "#message textarea").send_keys("How do I restart the Zephyr-7 pump?")
    click(d, "#send")
    eventually(lambda: [m for c in store.list_conversations(dana.id) for m in store.messages(c.id)
                        if m.role == "assistant"], "the answer")
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#chatbot .thought-group .title"), "the details")
    d.find_element(By.CSS_SELECTOR, "#chatbot .thought-group .title").click()
    wait_for(d, lambda d: "Sources:" in text_of(d, "#chatbot") and "Pump" in text_of(d, "#chatbot"),
             "the cited source")
    # the bubble lists the cited passage as "[1] <b>Pump</b> manual" (as text), which opens to its words
    citation = css(d, "#chatbot details.citation summary")
    assert citation.text.startswith("[1]") and "<b>Pump</b> manual" in citation.text
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", citation)
    citation.click()
    wait_for(d, lambda d: "blue reset key twice" in css(d, "#chatbot details.citation").text, "the passage")

    # ---- a memory learnt in chat is in the Memory tab when it is opened, without a reload
    open_tab(d, "Memory")
    assert "Rex" not in text_of(d, "#memory-table")
    open_tab(d, "Chat")
    css(d, "#message textarea").send_keys("Remember that my dog is called Rex.", Keys.ENTER)
    eventually(lambda: [m for m in lt.list_memories(dana.id) if "Rex" in m.text], "the memory learnt in chat")
    wait_for(d, lambda d: "Memory updated: remembered" in text_of(d, "#chatbot"), "the note on the bubble")
    open_tab(d, "Memory")
    wait_for(d, lambda d: "Rex" in text_of(d, "#memory-table"), "the new memory without a reload")
    screenshot(d, shots_dir(tmp_path), "memory")
    # the same two pages in Korean (the header's switch), for the docs
    click(d, "#lang-toggle")
    # a tab's table is drawn in the page's language when the tab is opened (the Memory tab is open now)
    open_tab(d, "문서")
    wait_for(d, lambda d: "나만" in text_of(d, "#doc-table"), "the document table in Korean")
    screenshot(d, shots_dir(tmp_path), "documents-ko")
    open_tab(d, "기억")
    wait_for(d, lambda d: "기억하는 내용" in text_of(d, "#memory-table") and "Rex" in text_of(d, "#memory-table"),
             "the memory table in Korean")
    screenshot(d, shots_dir(tmp_path), "memory-ko")
    click(d, "#lang-toggle")
    for m in lt.list_memories(dana.id):
        lt.forget(dana.id, m.id)

    # ---- memory: add, pick from the table, delete
    open_tab(d, "Memory")
    css(d, "#memory-new textarea").send_keys("I keep bees on my roof.", Keys.ENTER)
    wait_for(d, lambda d: "I keep bees on my roof." in text_of(d, "#memory-table"), "the memory in the list")
    [mem] = lt.list_memories(dana.id)
    cell = wait_for(d, lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, "#memory-table [role=gridcell]")
                                  if "bees" in c.text], "the memory cell")[0]
    cell.click()
    wait_for(d, lambda d: css(d, "#memory-text textarea").get_attribute("value") == mem.text, "the memory picked")
    click(d, "#memory-delete")
    css(d, "#memory-delete-ask")  # a destructive action asks first: nothing is deleted yet
    assert [m.id for m in lt.list_memories(dana.id)] == [mem.id]
    click(d, "#memory-delete-no")
    wait_for(d, lambda d: not d.find_elements(By.CSS_SELECTOR, "#memory-delete-yes")
             or not d.find_element(By.CSS_SELECTOR, "#memory-delete-yes").is_displayed(), "the question gone")
    assert [m.id for m in lt.list_memories(dana.id)] == [mem.id]
    click(d, "#memory-delete")
    click(d, "#memory-delete-yes")
    wait_for(d, lambda d: "Deleted" in text_of(d, "#memory-status"), "the delete notice")
    assert lt.list_memories(dana.id, include_history=True) == []

    # ---- delete the document: every chunk goes
    open_tab(d, "Documents")
    cell = wait_for(d, lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, "#doc-table [role=gridcell]")
                                  if "pump.md" in c.text], "the document cell")[0]
    cell.click()
    wait_for(d, lambda d: css(d, "#doc-pick input").get_attribute("value").startswith("<b>Pump"),
             "the document picked")
    click(d, "#doc-delete")
    css(d, "#doc-delete-ask")
    assert len(kb.list_documents(dana)) == 1  # the first click only asks
    click(d, "#doc-delete-yes")
    wait_for(d, lambda d: "Deleted the document" in text_of(d, "#doc-status"), "the delete notice")
    assert kb.list_documents(dana) == [] and kb.count_chunks() == 0


# ------------------------------------------------------------------------------ a fresh install
@pytest.fixture
def fresh_server(tmp_path, tiny_model_dir, tiny_adapters):
    """No users at all: what `make run` serves the first time."""
    srv = start_server(tmp_path / "fresh-home", tiny_model_dir, tiny_adapters, with_ui=True, max_new_tokens=24)
    srv.services.chat.set_serving("alpha")
    yield srv
    srv.stop()


def _in_page_order(driver, texts: list[str]) -> list[int]:
    """The vertical position of the first chat bubble showing each text (Markdown may reflow it)."""
    bubbles = driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user], #chatbot [data-testid=bot]")
    out = []
    for want in texts:
        match = [b for b in bubbles if shows(b.text, want)]
        assert match, f"no bubble shows {want!r}"
        out.append(match[0].location["y"])
    return out


def test_a_fresh_install_in_korean_from_the_first_admin_to_an_answer_replaced_in_place(
        fresh_server: ServerThread, browser, tmp_path):
    """First-run admin creation, Enter to send (Shift+Enter for a second line), Korean text drawn with the
    bundled font, a retrain refused up front with its reason, and regenerate-and-choose on an earlier
    answer that keeps the conversation's order, after a reload too."""
    d, store, url = browser, fresh_server.services.store, fresh_server.url
    shots = shots_dir(tmp_path)

    # ---- nobody has an account: the page offers to create the first admin
    d.get(url)
    css(d, "#setup-form")
    assert d.current_url.endswith("/setup")
    screenshot(d, shots, "setup")
    css(d, "#username").send_keys("ada")
    css(d, "#password").send_keys("ada-first-pass")
    css(d, "#again").send_keys("ada-first-pass")
    click(d, "#setup-submit")
    css(d, "#setup-done")
    [ada] = store.list_users()
    assert (ada.username, ada.role) == ("ada", "admin")
    click(d, "#setup-login")
    css(d, "input[type=password]")
    login(d, url, "ada", "ada-first-pass")
    assert d.title == "Self-improving assistant" and "Self-improving assistant" in text_of(d, "#product")

    # ---- Enter sends; Shift+Enter adds a line; Send is locked while the answer streams
    d.execute_script("""
        window.__locked = false;
        new MutationObserver(() => {
          const send = document.querySelector('#send');
          const streaming = [...document.querySelectorAll('#chatbot [data-testid=bot]')]
            .some(e => e.textContent.includes('▌'));
          if (send && send.disabled && streaming) window.__locked = true;
        }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});""")
    box = css(d, "#message textarea")
    box.send_keys("연차 휴가는 며칠인가요?")
    box.send_keys(Keys.SHIFT + Keys.ENTER)
    box.send_keys("출장비 정산 기한도 알려 주세요.")
    assert store.list_conversations(ada.id) == []  # Shift+Enter sent nothing
    box.send_keys(Keys.ENTER)
    conv = eventually(lambda: store.list_conversations(ada.id), "the conversation")[0]
    first_q = "연차 휴가는 며칠인가요?\n출장비 정산 기한도 알려 주세요."
    a1 = eventually(lambda: [m for m in store.messages(conv.id) if m.role == "assistant"], "the first answer")[0]
    assert store.messages(conv.id)[0].content == first_q
    wait_for(d, lambda d: answer_shown(d, a1.content) and not any("▌" in t for t in bot_texts(d)), "answer 1")
    assert d.execute_script("return window.__locked"), "Send was not locked while the answer streamed"
    assert css(d, "#send").is_enabled()

    # ---- Korean is drawn with the bundled font (the machine has no Korean font of its own)
    user_bubble = css(d, "#chatbot [data-testid=user]")
    assert "연차 휴가는 며칠인가요?" in user_bubble.text
    wait_for(d, lambda d: d.execute_script(
        "return [...document.fonts].some(f => f.family.includes('Hangul Fallback') && f.status === 'loaded')"),
        "the bundled Hangul font to load")
    screenshot(d, shots, "chat-korean")

    # ---- a second turn, then regenerate-and-choose on the FIRST answer
    css(d, "#message textarea").send_keys("Second question, in English.", Keys.ENTER)
    a2 = eventually(lambda: [m for m in store.messages(conv.id) if m.role == "assistant"][1:], "answer 2")[0]
    wait_for(d, lambda d: answer_shown(d, a2.content) and not any("▌" in t for t in bot_texts(d)), "answer 2")
    first_bot = [b for b in d.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")
                 if shows(b.text, a1.content)][0]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", first_bot)
    first_bot.click()  # selects the answer the feedback controls act on
    wait_for(d, lambda d: "Selected answer" in text_of(d, "#feedback-target") and shows(
        text_of(d, "#feedback-target"), " ".join(a1.content.split()[:6])), "the first answer selected")
    click(d, "#regenerate")
    wait_for(d, lambda d: d.find_element(By.CSS_SELECTOR, "#cmp-keep").is_enabled(), "the second answer")
    alt = eventually(lambda: [m for m in store.messages(conv.id) if m.status == "alternative"], "the alternative")[0]
    # the arrows ‹ › switch the first answer's own bubble between the new answer (2/2) and the old one (1/2)
    def bubble_order(want: str, mark: str) -> bool:
        try:
            q1, shown, q2 = _in_page_order(d, [first_q, want, "Second question, in English."])
        except AssertionError:  # not drawn yet
            return False
        return q1 < shown < q2 and mark in [b.text for b in d.find_elements(
            By.CSS_SELECTOR, "#chatbot [data-testid=bot]") if shows(b.text, want)][0]

    wait_for(d, lambda d: bubble_order(alt.content, "‹ 2/2 ›"), "the new answer in the first answer's bubble")
    screenshot(d, shots, "regenerate")
    click(d, "#cmp-prev")
    wait_for(d, lambda d: bubble_order(a1.content, "‹ 1/2 ›") and "1/2" in text_of(d, "#cmp-pos"), "back to 1/2")
    assert not answer_shown(d, alt.content)
    click(d, "#cmp-next")
    wait_for(d, lambda d: bubble_order(alt.content, "‹ 2/2 ›"), "2/2 again")
    assert not [f for f in store.feedback_for_message(a1.id) if f.kind == "pair"]  # nothing stored by looking
    click(d, "#cmp-keep")
    wait_for(d, lambda d: "you kept the new answer" in text_of(d, "#notice"), "the choice notice")
    pair = eventually(lambda: [f for f in store.feedback_for_message(a1.id) if f.kind == "pair"], "the pair")[0]
    assert (pair.message_id, pair.other_message_id, pair.chosen_message_id) == (a1.id, alt.id, alt.id)
    wait_for(d, lambda d: not any(e.is_displayed() for e in d.find_elements(By.CSS_SELECTOR, "#compare")),
             "the arrows to go")
    assert "‹ 2/2 ›" not in text_of(d, "#chatbot")
    for when in ("after the choice", "after a reload"):
        wait_for(d, lambda d: answer_shown(d, alt.content), f"the chosen answer {when}")
        q1, chosen, q2, second = _in_page_order(d, [first_q, alt.content, "Second question, in English.",
                                                    a2.content])
        assert q1 < chosen < q2 < second, f"the conversation is out of order {when}"
        d.refresh()
        css(d, "#message textarea")
    stored = [(m.role, m.id) for m in store.messages(conv.id) if m.status != "alternative"]
    assert stored == [("user", stored[0][1]), ("assistant", alt.id), ("user", stored[2][1]), ("assistant", a2.id)]
    assert alt.id > a2.id  # stored after the later question, shown (and sent to the model) in its place

    # ---- the admin adds a person; a retrain with this little feedback is refused up front, with its reason
    open_tab(d, "Admin")
    css(d, "#person-name textarea, #person-name input").send_keys("bea")
    css(d, "#person-password input").send_keys("bea-first-pass")
    css(d, "#person-again input").send_keys("bea-first-pass")
    click(d, "#person-add")
    wait_for(d, lambda d: "bea" in text_of(d, "#person-note"), "the new person")
    bea = store.get_user_by_name("bea")
    assert bea is not None and bea.role == "user" and store.authenticate("bea", "bea-first-pass")
    wait_for(d, lambda d: "Not ready to retrain" in text_of(d, "#readiness"), "the readiness check")
    click(d, "#retrain-start")
    wait_for(d, lambda d: "Not started." in text_of(d, "#job-status"), "the refusal")
    assert "Training needs at least" in text_of(d, "#job-status")
    assert "Error" not in text_of(d, "#job-status")
    from training.jobs import runner_for
    assert runner_for(fresh_server.services).list() == []  # nothing was started or recorded
    d.execute_script("arguments[0].scrollIntoView({block: 'start'});", css(d, "#retrain-stages"))
    screenshot(d, shots, "admin")


@pytest.fixture
def browser_ko(tmp_path):
    """Chromium asking for Korean pages (navigator.language "ko")."""
    os.environ["SE_OFFLINE"] = "true"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile-ko'}", "--window-size=1280,1000", "--lang=ko"):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"intl.accept_languages": "ko,ko-KR"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def test_the_page_speaks_the_browsers_language(server: ServerThread, browser_ko, tmp_path):
    d = browser_ko
    server.services.store.create_user("hana", "hana-pass-1", role="admin")
    d.get(server.url)
    css(d, "input[type=password]")
    # the login form's note (ours, next to Gradio's own Korean labels) is in the browser's language too
    wait_for(d, lambda d: "계정으로 로그인하세요" in d.find_element(By.TAG_NAME, "body").text, "the Korean login note")
    assert "Log in with your account" not in d.find_element(By.TAG_NAME, "body").text
    # the login form is drawn without the page's css: the note brings the bundled Hangul font, which the browser
    # loads for the Korean text (else it shows as empty boxes where no Korean font is installed, as here)
    wait_for(d, lambda d: d.execute_script(
        "return [...document.fonts].some(f => f.family.includes('Hangul Fallback') && f.status === 'loaded')"),
        "the Hangul font on the login form")
    screenshot(d, shots_dir(tmp_path), "login-ko")
    login(d, server.url, "hana", "hana-pass-1")
    assert d.execute_script("return navigator.language").startswith("ko")
    tabs = wait_for(d, lambda d: [b.text.strip() for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                  if b.text.strip()], "the tabs")
    assert tabs[:5] == ["채팅", "문서", "기억", "계정", "나의 어시스턴트"], tabs
    assert css(d, "#send").text.strip() == "보내기"
    # a line the server writes (the key translated, the name kept) and the account tab's form
    wait_for(d, lambda d: "관리자로 로그인: hana" in text_of(d, "#whoami"), "the Korean signed-in line")
    open_tab(d, "계정")
    wait_for(d, lambda d: css(d, "#pw-change").text.strip() == "비밀번호 바꾸기", "the account tab in Korean")
    assert "현재 비밀번호" in text_of(d, "#pw-old")
    screenshot(d, shots_dir(tmp_path), "account-ko")
    open_tab(d, "채팅")
    # the header's switch changes the page's language in place, every tab's label included (not only the
    # open one's), the browser keeps it over a reload, and it switches back
    def tab_names(d) -> list[str]:
        return [b.text.strip() for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip()]

    def all_tabs(want: list[str]) -> None:
        try:
            wait_for(d, lambda d: tab_names(d) == want, f"the tabs showing {want}")
        except TimeoutException as e:
            raise AssertionError(f"the tabs show {tab_names(d)}, not {want}") from e

    english = ["Chat", "Documents", "Memory", "Account", "My assistant", "Admin"]  # hana is an admin
    korean = ["채팅", "문서", "기억", "계정", "나의 어시스턴트", "관리"]
    all_tabs(korean)
    click(d, "#lang-toggle")
    all_tabs(english)
    d.refresh()
    all_tabs(english)
    assert css(d, "#lang-toggle").text.strip() == "한국어"
    open_tab(d, "Account")  # a tab opened after the switch is drawn in English too
    wait_for(d, lambda d: css(d, "#pw-change").text.strip() == "Change password", "the account tab in English")
    open_tab(d, "Chat")
    click(d, "#lang-toggle")
    all_tabs(korean)
    assert "Enter로 보내기" in css(d, "#message textarea").get_attribute("placeholder")
    wait_for(d, lambda d: d.execute_script(
        "return [...document.fonts].some(f => f.family.includes('Hangul Fallback') && f.status === 'loaded')"),
        "the bundled Hangul font to load")
    # what the server writes is in the page's language too: the chat's line about the selected answer
    wait_for(d, lambda d: "아직 선택한 답변이 없습니다" in text_of(d, "#feedback-target"), "the line in Korean")
    screenshot(d, shots_dir(tmp_path), "chat-ko")
    open_tab(d, "나의 어시스턴트")
    wait_for(d, lambda d: "어댑터" in text_of(d, "#personal-status"), "My assistant in Korean")
    assert not re.search(r"[A-Za-z]{5,}", text_of(d, "#personal-status"))
    screenshot(d, shots_dir(tmp_path), "personal-ko")
    # the admin console speaks Korean too: its retrain form, with a sentence of help under each field, the
    # readiness check and the tables' headings
    open_tab(d, "관리")
    assert css(d, "#retrain-start").text.strip() == "재학습 시작"
    wait_for(d, lambda d: "SFT 에포크" in text_of(d, "#retrain-epochs"), "the form's Korean labels")
    assert "과적합" in text_of(d, "#retrain-epochs")  # the help text
    wait_for(d, lambda d: "재학습할 수" in text_of(d, "#readiness") and "예시를 쓰는 방법" in text_of(d, "#readiness"),
             "the readiness check in Korean")
    assert "결과" in text_of(d, "#jobs-table") and "Not ready" not in text_of(d, "#readiness")
    d.execute_script("arguments[0].scrollIntoView({block: 'start'});", css(d, "#retrain-stages"))
    screenshot(d, shots_dir(tmp_path), "admin-ko")
