"""The review page in a real Chromium (Debian's, driven by Selenium through chromium-driver).

A small real search on the toy target (real Ray, sandbox, git, Optuna/SQLite), its page opened in
the browser: the trial table, a candidate's diff and plot, a reject, a note and an approval made by
clicking; then the search goes on with the LLM proposer against the scripted Messages API, and the
note must be in the request body of its next proposal, the rejected candidate never a parent, the
approved one replayed, and the open page must show the new trials without a reload.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from agent.live import Live
from agent.loop import Search
from agent.review.server import TOKEN_HEADER, ReviewServer
from agent.runner import build_proposers, open_search
from agent.settings import SearchSettings
from env.pool import Pool
from runs_db import reviews as rv
from runs_db.db import RunsDB
from tests.fake_anthropic import DEFAULT_USAGE, FakeAnthropic, Reply
from tests.toy import make_toy

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
NOTE = "NOTE-7731: try a cosine schedule instead of touching SLEEP"
NOTE2 = "NOTE-4410: doubling the rate overshoots"


@pytest.fixture
def browser(monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium never looks for a driver or browser online
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, to find its errors
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, fn, timeout: float = 30):
    """Until `fn` is truthy; the table is redrawn when the data changes, so an element may go stale."""
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=[StaleElementReferenceException]).until(lambda d: fn(d))


def rows(driver, attr: str = "commit") -> list[str]:
    """The table's rows, read in one script (atomic, unlike element handles)."""
    script = f"return [...document.querySelectorAll('#trials tbody tr')].map(r => r.dataset.{attr})"
    return driver.execute_script(script)


def click(driver, css: str) -> bool:
    driver.find_element(By.CSS_SELECTOR, css).click()
    return True


def llm_reply(i: int) -> Reply:
    """A proposal that applies to every parent the ideas made (they never touch MODE)."""
    edits = f'train.py\n<<<<<<< SEARCH\nMODE = "ok"\n=======\nMODE = "ok"\nEXTRA_{i} = {i}\n>>>>>>> REPLACE\n'
    body = {"id": None, "type": "message", "role": "assistant", "model": None, "stop_reason": "tool_use",
            "stop_sequence": None, "usage": dict(DEFAULT_USAGE),
            "content": [{"type": "tool_use", "id": None, "name": "submit_patch",
                         "input": {"title": f"extra constant {i}", "rationale": "r", "edits": edits}}]}
    return Reply(200, body)


def post(url: str, body: dict, headers: dict) -> int:
    req = urllib.request.Request(url + "api/review", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_review_page_in_chromium(ray_cluster, tmp_path: Path, monkeypatch, browser):
    toy = make_toy(tmp_path / "toy", gpus=1, sleep=0.01, full=20, short=10)
    settings = SearchSettings(target=str(toy.source), proposers=("ideas",), seeds=2, budget_trials=10,
                              max_fidelity="full", workers=4)
    d = tmp_path / "search"
    db, settings = open_search(d, settings)
    with db:
        Search(db, toy, settings, Pool(run_root=tmp_path / "runs"), build_proposers(settings, toy, db),
               Live(enabled=False)).run()
        titles = {c.title: c.commit for c in db.candidates() if c.parent == db.base_commit}
        n_before = len(db.trials())
        n_rungs = sum(1 for t in db.trials() if t.proposer == "ideas")  # what budget_trials counts
    double, less = titles["Double the rate"], titles["Sleep less per step"]

    server = ReviewServer(d).start()
    try:
        base_url = f"http://127.0.0.1:{server.port}/"
        # no token, a wrong token, or a foreign Host: refused, and nothing is written
        assert post(base_url, {"commit": double, "decision": "reject"}, {}) == 403
        assert post(base_url, {"commit": double, "decision": "reject"}, {TOKEN_HEADER: "nope"}) == 403
        assert post(base_url, {"commit": double, "decision": "reject"},
                    {TOKEN_HEADER: server.token, "Host": f"evil.example:{server.port}"}) == 403

        # 1. the page of the finished search: every trial in the table, sortable and filterable
        browser.get(server.url)
        browser.find_element(By.ID, "hidebase").click()  # show the base's runs too: every trial
        wait(browser, lambda b: len(rows(b)) == n_before)
        browser.find_element(By.CSS_SELECTOR, 'th[data-key="number"]').click()  # ascending
        assert [int(n) for n in rows(browser, "number")] == list(range(n_before))
        browser.find_element(By.ID, "filter").send_keys(f"sleep less {less[:10]}")  # every word must match
        wait(browser, lambda b: set(rows(b)) == {less})
        browser.find_element(By.ID, "filter").clear()
        browser.find_element(By.ID, "filter").send_keys(" ")  # `clear` fires no input event

        # 2. a candidate: its side-by-side diff and its plot, one series per seed plus the base's band
        wait(browser, lambda b: len(rows(b)) == n_before)
        wait(browser, lambda b: click(b, f'tr[data-commit="{less}"]'))
        wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#diff td.code.b"))
        new_side = " ".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, "tr.replace td.code.b"))
        old_side = " ".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, "tr.replace td.code.a"))
        assert "SLEEP = 0.005" in new_side and "SLEEP = 0.01" in old_side
        assert browser.find_elements(By.CSS_SELECTOR, "#diff span.n")  # Pygments' classes: highlighted
        with RunsDB.open(d) as db:  # the page plots the highest fidelity the candidate ran at
            runs = [r for t in db.trials() if t.commit == less for r in db.runs(t.number) if r.curve]
            fid = max((r.fidelity for r in runs), key=("smoke", "short", "full").index)
            n_seeds, band = sum(1 for r in runs if r.fidelity == fid), 3 if db.baseline(fid) else 0
        assert fid in ("short", "full") and n_seeds >= 1 and band == 3
        wait(browser, lambda b: b.execute_script("const p = document.getElementById('plot'); "
                                                 "return p.data ? p.data.length : -1") == n_seeds + band)
        names = browser.execute_script("return document.getElementById('plot').data.map(t => t.name)")
        assert sum(n.startswith("seed ") for n in names) == n_seeds and "base mean" in names

        # 3. a note and an approval on this one, a reject on another
        browser.find_element(By.ID, "note").send_keys(NOTE)
        browser.find_element(By.ID, "savenote").click()
        wait(browser, lambda b: b.find_element(By.ID, "rmsg").text == "recorded")
        browser.find_element(By.ID, "approve").click()
        wait(browser, lambda b: "decision: approve" in b.find_element(By.ID, "rstate").text)
        browser.get(f"{base_url}#/c/{double}")
        wait(browser, lambda b: b.find_element(By.ID, "ctitle").text == "Double the rate")
        browser.find_element(By.ID, "reject").click()
        wait(browser, lambda b: "decision: reject" in b.find_element(By.ID, "rstate").text)

        # 4. the runs database holds both: study attrs and git notes
        with RunsDB.open(d) as db:
            got = rv.reviews(db)
            assert got[double].decision == "reject" and got[less].note == NOTE and got[less].decision == "approve"
            assert rv.approved_pending(db) == [less]
            assert "review: reject" in rv.note_text(db, double) and NOTE in rv.note_text(db, less)

        # while a search holds the folder's writer lock the page only queues; the search applies it
        with rv.writer(d) as held:
            assert held
            assert post(base_url, {"commit": double, "note": NOTE2}, {TOKEN_HEADER: server.token}) == 200
            with RunsDB.open(d) as db:
                assert rv.reviews(db)[double].note is None and [q["commit"] for q in rv.queued(d)] == [double]

        # the search goes on with the LLM: the note reaches its prompt, the rejected one is never a
        # parent, the approved one is replayed, and the open page shows the new trials by itself
        browser.get(base_url)
        browser.find_element(By.ID, "hidebase").click()
        wait(browser, lambda b: len(rows(b)) == n_before)
        with FakeAnthropic(responder=lambda req: llm_reply(len(api.requests))) as api:
            monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
            monkeypatch.setenv("ANTHROPIC_BASE_URL", api.base_url)
            more = SearchSettings(target=str(toy.source), proposers=("llm",), seeds=2, budget_trials=n_rungs + 4,
                                  max_fidelity="full", workers=4)
            with RunsDB.open(d) as db:
                # only the LLM proposes; the idea library still hears how its candidates climbing on end
                proposers = {**build_proposers(settings, toy, db), **build_proposers(more, toy, db)}
                search = Search(db, toy, more, Pool(run_root=tmp_path / "runs"), proposers, Live(enabled=False))
                summary = search.run()
                trials = db.trials()
                pending, got_double = rv.approved_pending(db), rv.reviews(db)[double]
            bodies = [json.dumps(r.body) for r in api.requests]
        assert summary.trials == n_rungs + 4 and bodies
        assert NOTE in bodies[0], "the reviewer's note is not in the next proposal's prompt"
        assert all(f"(commit {double})" not in b for b in bodies), "a rejected candidate was asked to be a parent"
        new = [t for t in trials if t.number >= n_before and t.proposer == "llm"]
        assert new and all(t.parent != double for t in new)
        replays = [t for t in trials if t.proposer == "replay" and t.commit == less]
        assert len(replays) == 1 and replays[0].state == "complete" and replays[0].attrs["speedup_text"]
        assert pending == [] and got_double.note == NOTE2 and got_double.decision == "reject" and not rv.queued(d)
        wait(browser, lambda b: len(rows(b)) == len(trials))  # polled, never reloaded
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors  # no script error, nothing the page's Content-Security-Policy refused
    finally:
        server.stop()


def test_review_command(tmp_path: Path):
    """`speedsearch review` as a user runs it: URL and token on start, a token-guarded API, the page's
    assets served locally, a user's mistake in one line, Ctrl-C exits 130."""
    toy = make_toy(tmp_path / "toy")
    d = tmp_path / "search"
    db, _ = open_search(d, SearchSettings(target=str(toy.source), proposers=("ideas",)))
    base = db.base_commit
    db.close()
    bad = subprocess.run([sys.executable, "-m", "agent", "review", "--dir", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--dir" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    proc = subprocess.Popen([sys.executable, "-m", "agent", "review", "--dir", str(d), "--port", "0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        url, token = info["url"].split("#")[0], info["token"]
        assert info["url"].startswith("http://127.0.0.1:") and info["url"].endswith(f"#token={token}")

        def get(path: str, headers: dict | None = None) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers or {}), timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        status, page = get("")
        assert status == 200 and b"speedsearch review" in page and b'src="/plotly.min.js"' in page
        status, js = get("plotly.min.js")
        assert status == 200 and len(js) > 1_000_000  # the plotly package's own bundle, no CDN
        assert get("api/trials")[0] == 403
        status, body = get("api/trials", {TOKEN_HEADER: token})
        assert status == 200 and json.loads(body)["trials"] == [] and json.loads(body)["base"] == base
        assert post(url, {"commit": base, "decision": "reject"}, {TOKEN_HEADER: token}) == 400
        assert post(url, {"commit": "f" * 40, "decision": "reject"}, {TOKEN_HEADER: token}) == 400
        assert get("../search.toml")[0] == 404 and get("api/candidate/zzz", {TOKEN_HEADER: token})[0] == 404
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)  # it stops its local Ray on the way out: slow when both cores are busy
    assert rc == 130
