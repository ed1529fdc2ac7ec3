"""The web console in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, through selenium).

Flows: log in, find a user, open their page, edit a memory, see the next answer change (the trace's
final prompt on the page changes), pin and delete, forget the user (with the confirmation dialog).

The backend is ``ScriptedBackend`` echoing its whole prompt, not the local model: what this test proves
is the console's loop (edit -> stored -> the next turn's prompt -> shown), and with an echo the answer *is*
the prompt, so the change is exact and the test takes seconds; what the local model then writes from a
prompt is covered by the model tests. The server is real (uvicorn on loopback), as are the store and the
OpenAI SDK that sends the turns.

Chromium is installed through apt when missing; where apt cannot (no root, no network), the test skips
with a loud reason. ``PERSONA_MW_CONSOLE_SCREENSHOTS=docs/img`` writes the docs' screenshots
(``console-*.png``); otherwise they go to the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from persona_mw import Middleware, parse_config
from persona_mw.server import create_app, serve_in_thread
from persona_mw.testing import ScriptedBackend
from persona_mw.types import Message

pytestmark = pytest.mark.slow

KEY = "acme-console-key-1"
CONFIG = "pipeline:\n  - use: stated\n  - use: profile\n    features: {embedding: false, ngram_dim: 64}\n" \
         "  - use: memory\n    embedder: false\n    mode: bm25\n"


def echo_prompt(messages: list[Message]) -> str:
    return "\n".join(f"[{m.role}] {m.text}" for m in messages)


def _chromium() -> tuple[str, str]:
    """Paths of chromium and its driver, installing Debian's packages through apt when missing."""
    def found() -> tuple[str | None, str | None]:
        return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")

    browser, driver = found()
    if browser and driver:
        return browser, driver
    why = ""
    apt = shutil.which("apt-get")
    if apt is None:
        why = "no apt-get on this machine"
    else:
        sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
        if sudo is None:
            why = "not root and no sudo"
        else:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            for cmd in (sudo + [apt, "update", "-q"], sudo + [apt, "install", "-y", "-q", "chromium", "chromium-driver"]):
                run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
                if run.returncode != 0:
                    why = f"{' '.join(cmd)} failed: {(run.stderr or run.stdout)[-300:]}"
                    break
        browser, driver = found()
        if browser and driver:
            return browser, driver
    msg = f"BROWSER TEST NOT RUN: chromium/chromium-driver are missing and apt could not install them ({why})"
    warnings.warn(msg, stacklevel=1)
    print("\n" + "!" * 20 + " " + msg + " " + "!" * 20)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="module")
def server(session_store_url: Callable[[], str]) -> Iterator[tuple[str, Middleware]]:
    cfg = parse_config(CONFIG)
    cfg.store.path = session_store_url()
    mw = Middleware(cfg, backend=ScriptedBackend(script=echo_prompt), autoload=False)
    with serve_in_thread(create_app(mw, api_keys={"acme": [KEY]})) as url:
        yield url, mw
    mw.close()


def _shots(tmp_path: Path) -> Path:
    target = os.environ.get("PERSONA_MW_CONSOLE_SCREENSHOTS")
    out = Path(target) if target else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


def _shot(drv: Any, folder: Path, name: str, element: str | None = None) -> None:
    if element is not None:  # one section of the page
        from selenium.webdriver.common.by import By

        drv.find_element(By.ID, element).screenshot(str(folder / f"console-{name}.png"))
        return
    drv.execute_script("window.scrollTo(0, 0)")
    height = drv.execute_script("return document.documentElement.scrollHeight")
    drv.set_window_size(1280, min(max(int(height), 700), 2600))
    drv.save_screenshot(str(folder / f"console-{name}.png"))
    drv.set_window_size(1280, 1000)


def test_open_a_user_edit_a_memory_see_the_next_answer_change_and_forget(
        browser: Any, server: Any, tmp_path: Path) -> None:
    from openai import OpenAI
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    drv = browser
    wait = WebDriverWait(drv, 20)
    shots = _shots(tmp_path)
    auth = {"Authorization": f"Bearer {KEY}"}
    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)

    def ask(user: str, text: str) -> str:
        out = client.chat.completions.create(model="m", user=user, messages=[{"role": "user", "content": text}])
        return out.choices[0].message.content or ""

    # a user with some history: stated preferences, a choice, a hostile memory, and two turns
    for ev in ({"kind": "stated", "user": "maria", "text": "Keep answers short."},
               {"kind": "stated", "user": "maria", "text": "No meat, I am vegetarian."},
               {"kind": "choice", "user": "maria", "prompt": "Dinner idea?", "chosen": "A quick lentil soup.",
                "rejected": ["A long essay about the history of soup, in five parts."]},
               {"kind": "rating", "user": "maria", "prompt": "Tea?", "response": "Green tea.", "rating": 0.9}):
        httpx.post(url + "/v1/feedback", json=ev, headers=auth).raise_for_status()
    httpx.post(url + "/v1/users/maria/memories", json={"text": "I love hiking in the Alps"}, headers=auth).raise_for_status()
    httpx.post(url + "/v1/users/maria/memories", json={"text": "Maria's notes: <script>document.title='pwned'</script>",
                                                       "kind": "fact", "polarity": None}, headers=auth).raise_for_status()
    httpx.put(url + "/v1/users/maria/groups/climbers", headers=auth).raise_for_status()
    httpx.post(url + "/v1/feedback", json={"kind": "stated", "user": "bob", "text": "Use metric units."},
               headers=auth).raise_for_status()
    assert "I love hiking in the Alps" in ask("maria", "Where should I go this weekend?")

    # log in
    drv.get(url + "/console/")
    wait.until(ec.presence_of_element_located((By.ID, "key")))
    _shot(drv, shots, "login")
    drv.find_element(By.ID, "key").send_keys(KEY)
    drv.find_element(By.ID, "login").click()
    wait.until(ec.presence_of_element_located((By.ID, "users")))

    # users list and search
    assert {"maria", "bob"} <= {a.text for a in drv.find_elements(By.CSS_SELECTOR, "a.user-link")}
    drv.find_element(By.ID, "q").send_keys("mar")
    drv.find_element(By.ID, "search").click()
    wait.until(ec.url_contains("q=mar"))
    assert [a.text for a in drv.find_elements(By.CSS_SELECTOR, "a.user-link")] == ["maria"]
    _shot(drv, shots, "users")

    # open the user: profile in words, the scope picture, memories, feedback, the last turn's prompt
    drv.find_element(By.LINK_TEXT, "maria").click()
    wait.until(ec.presence_of_element_located((By.ID, "user-id")))
    assert drv.title.startswith("maria")  # the stored <script> did not run
    stated = drv.find_element(By.ID, "stated").text
    assert "Keep answers short." in stated and "vegetarian" in stated
    assert "group:climbers" in drv.find_element(By.ID, "scope").get_attribute("innerHTML")
    assert "<script>document.title" in drv.find_element(By.ID, "memory-table").get_attribute("innerHTML") \
        .replace("&lt;", "<").replace("&gt;", ">")
    assert len(drv.find_elements(By.CSS_SELECTOR, "#feedback-list > li")) == 4
    first_trace = drv.find_element(By.CSS_SELECTOR, "details.trace[open]").text
    assert "I love hiking in the Alps" in first_trace and "memory" in first_trace
    _shot(drv, shots, "user")

    # edit a memory
    row = next(r for r in drv.find_elements(By.CSS_SELECTOR, "tr.memory")
               if r.find_element(By.CSS_SELECTOR, "input.mem-text").get_attribute("value") == "I love hiking in the Alps")
    mem_id = row.get_attribute("data-id")
    box = row.find_element(By.CSS_SELECTOR, "input.mem-text")
    box.clear()
    box.send_keys("I love sailing on Lake Geneva")
    row.find_element(By.CSS_SELECTOR, "button.save").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "notice"), "Memory saved."))
    saved = drv.find_element(By.ID, f"mem-{mem_id}").find_element(By.CSS_SELECTOR, "input.mem-text")
    assert saved.get_attribute("value") == "I love sailing on Lake Geneva"

    # the next answer changes, and the page shows the new turn's final prompt
    answer = ask("maria", "Where should I go this weekend?")
    assert "Lake Geneva" in answer and "Alps" not in answer
    drv.refresh()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "details.trace[open]")))
    newest = drv.find_element(By.CSS_SELECTOR, "details.trace[open]").text
    assert "I love sailing on Lake Geneva" in newest and "Alps" not in newest
    _shot(drv, shots, "trace", element="traces")

    # pin the fact, then delete it (confirmation dialog)
    fact_row = next(r for r in drv.find_elements(By.CSS_SELECTOR, "tr.memory")
                    if "Maria's notes" in (r.find_element(By.CSS_SELECTOR, "input.mem-text").get_attribute("value") or ""))
    fact_id = fact_row.get_attribute("data-id")
    fact_row.find_element(By.CSS_SELECTOR, "button.pin").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "notice"), "Memory pinned."))
    assert "pinned" in drv.find_element(By.ID, f"mem-{fact_id}").text
    drv.find_element(By.ID, f"mem-{fact_id}").find_element(By.CSS_SELECTOR, "button.delete").click()
    wait.until(ec.alert_is_present()).accept()
    wait.until(ec.text_to_be_present_in_element((By.ID, "notice"), "Memory deleted."))
    assert not drv.find_elements(By.ID, f"mem-{fact_id}")

    # forget: dismissing the dialog keeps everything; confirming deletes the user
    drv.find_element(By.ID, "confirm").send_keys("maria")
    drv.find_element(By.ID, "forget").click()
    wait.until(ec.alert_is_present()).dismiss()
    assert httpx.get(url + "/v1/users/maria/memories", headers=auth).status_code == 200
    drv.find_element(By.ID, "forget").click()
    wait.until(ec.alert_is_present()).accept()
    wait.until(ec.text_to_be_present_in_element((By.ID, "notice"), "Forgot maria"))
    assert "maria" not in [a.text for a in drv.find_elements(By.CSS_SELECTOR, "a.user-link")]
    assert httpx.get(url + "/v1/users/maria", headers=auth).status_code == 404
    drv.get(url + "/console/users/maria")
    assert "unknown user" in drv.find_element(By.ID, "error").text
