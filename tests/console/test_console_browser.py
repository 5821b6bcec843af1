"""The console in a real browser (issue 18, first part): log in, find an account, top it up
and see the balance change, a double submit credited once, a form without its CSRF token
refused, an owner kept to their own account, and the security headers and cookie."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from tests.admin_client import ADMIN_TOKEN, Admin
from tests.billing.checks import micros
from tests.conftest import model_entry
from tests.procs import Proc


@pytest.fixture
def console(make_gateway: Callable[..., Proc], mock_a: Proc) -> Proc:
    return make_gateway([model_entry("m", mock_a.url, upstream_model="mock-model")])


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    opened = browser.new_context(viewport={"width": 1100, "height": 800})
    yield opened
    opened.close()


def _login(page: Page, url: str, token: str) -> None:
    page.goto(url + "/console")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def test_an_operator_finds_an_account_and_tops_it_up(
    console: Proc, context: BrowserContext, shots: Path
) -> None:
    """Logged in with the admin token, the operator finds the account by its id's prefix,
    tops it up, and sees the new balance, which the admin API agrees with."""
    admin = Admin(console.url)
    account_id, _ = admin.funded(["m"], amount="1.50")
    page = context.new_page()
    _login(page, console.url, ADMIN_TOKEN)
    assert page.url.endswith("/console/accounts")
    page.fill("#prefix", account_id[:10])
    page.select_option("#state", "active")
    page.click("form.filters button")
    page.screenshot(path=shots / "accounts.png", full_page=True)
    page.click(f"a[href='/console/accounts/{account_id}']")
    assert page.inner_text("#balance").startswith("1.500000")
    page.fill("#amount", "2.25")
    page.click("#topup button")
    page.wait_for_load_state()
    assert "credited" in page.inner_text("[role=status]")
    assert page.inner_text("#balance").startswith("3.750000")
    assert admin.account(account_id)["balance"] == "3.750000"
    page.screenshot(path=shots / "account.png", full_page=True)


def test_a_double_submitted_top_up_is_credited_once(console: Proc, context: BrowserContext) -> None:
    """The same rendered form sent three times (a double click and two resends of its very
    fields) credits once: the page's Idempotency-Key goes with every send."""
    admin = Admin(console.url)
    account_id, _ = admin.funded(["m"], amount="1.00")
    page = context.new_page()
    _login(page, console.url, ADMIN_TOKEN)
    page.goto(f"{console.url}/console/accounts/{account_id}")
    page.fill("#amount", "5.00")
    statuses = page.evaluate(
        """async () => {
            const form = document.querySelector('#topup');
            const sent = [];
            for (let i = 0; i < 2; i++) {
                const body = new URLSearchParams(new FormData(form));
                const r = await fetch(form.action, {method: 'POST', body});
                sent.push(r.status);
            }
            return sent;
        }"""
    )
    assert statuses == [200, 200]  # each answered with the account page, after its redirect
    page.dblclick("#topup button")
    page.wait_for_load_state()
    assert admin.account(account_id)["balance"] == "6.000000"


def test_a_form_without_its_csrf_token_is_refused(console: Proc, context: BrowserContext) -> None:
    """A POST with the session's cookie but without the form's CSRF token (what another site
    could make the browser send) is 403 with a sentence, and credits nothing."""
    admin = Admin(console.url)
    account_id, _ = admin.funded(["m"], amount="1.00")
    page = context.new_page()
    _login(page, console.url, ADMIN_TOKEN)
    for form in ({"amount": "9.00"}, {"amount": "9.00", "csrf": "not-the-token"}):
        answer = page.request.post(
            f"{console.url}/console/accounts/{account_id}/topups", form=form, max_redirects=0
        )
        assert answer.status == 403
        assert "CSRF" in answer.text()
        assert "Traceback" not in answer.text()
    assert admin.account(account_id)["balance"] == "1.000000"


def test_an_owner_sees_only_their_account(console: Proc, context: BrowserContext) -> None:
    """Logged in with an account's API key, the owner lands on that account, read only (no
    top-up form); another account, the account list and a top-up are refused."""
    admin = Admin(console.url)
    account_id, key = admin.funded(["m"], amount="4.00")
    other_id, _ = admin.funded(["m"], amount="4.00")
    page = context.new_page()
    _login(page, console.url, key)
    assert page.url.endswith(f"/console/accounts/{account_id}")
    assert page.inner_text("#balance").startswith("4.000000")
    assert page.locator("#topup").count() == 0
    refused = page.goto(f"{console.url}/console/accounts/{other_id}")
    assert refused is not None
    assert refused.status == 404
    assert "no such account" in page.inner_text("[role=alert]")
    listing = page.goto(f"{console.url}/console/accounts")
    assert listing is not None
    assert listing.status == 403
    csrf = page.evaluate("document.querySelector('input[name=csrf]').value")
    answer = page.request.post(
        f"{console.url}/console/accounts/{account_id}/topups",
        form={"amount": "1.00", "csrf": csrf},
        max_redirects=0,
    )
    assert answer.status == 403
    assert admin.account(account_id)["balance"] == "4.000000"


def test_a_bad_login_and_the_security_headers(console: Proc, context: BrowserContext) -> None:
    """A wrong token is a sentence on the login page; a good login sets an HttpOnly,
    SameSite=Strict cookie; every page has a Content-Security-Policy; logging out ends the
    session in the store."""
    page = context.new_page()
    _login(page, console.url, "sk-gw-nobody.key_000000000000.nothing")
    assert "neither the admin token nor an API key" in page.inner_text("[role=alert]")
    answer = page.goto(console.url + "/console/login")
    assert answer is not None
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["x-frame-options"] == "DENY"
    _login(page, console.url, ADMIN_TOKEN)
    (cookie,) = [c for c in context.cookies() if c["name"] == "gw_console"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["expires"] > 0
    page.click("nav button")
    page.wait_for_load_state()
    assert page.url.endswith("/console/login")
    context.add_cookies([{**cookie}])  # the old cookie again: its session is gone
    page.goto(console.url + "/console/accounts")
    assert page.url.endswith("/console/login")


@pytest.mark.parametrize(
    "path",
    [
        "/console/login",
        "/console/accounts",
        "account",
        "statement",
        "/console/overview",
        "/console/prices",
    ],
)
def test_pages_fit_a_360px_screen(console: Proc, browser: Browser, shots: Path, path: str) -> None:
    """No page is wider than a 360 px phone screen (tables scroll inside their box)."""
    admin = Admin(console.url)
    account_id, _ = admin.funded(["m"], amount="1.00")
    context = browser.new_context(viewport={"width": 360, "height": 740})
    try:
        page = context.new_page()
        if path != "/console/login":
            _login(page, console.url, ADMIN_TOKEN)
        pages = {
            "account": f"/console/accounts/{account_id}",
            "statement": f"/console/accounts/{account_id}/statement?month=2026-12",
        }
        answer = page.goto(console.url + pages.get(path, path))
        assert answer is not None
        assert answer.status == 200
        width = page.evaluate("document.documentElement.scrollWidth")
        page.screenshot(path=shots / f"narrow-{path.strip('/').replace('/', '-')}.png")
        assert width <= 360, width
        assert micros(admin.account(account_id)["balance"]) == 1_000_000
    finally:
        context.close()


def test_the_account_page_charts_the_accounts_usage(
    console: Proc, context: BrowserContext, shots: Path
) -> None:
    """After calls on the account, its page draws the usage chart (uPlot's canvas, one point
    per day the admin API's summary has) and the by-model table shows the summary's calls and
    cost; an account without calls says so, with no chart."""
    admin = Admin(console.url)
    account_id, key = admin.funded(["m"], amount="5.00")
    idle_id, _ = admin.funded(["m"], amount="5.00")
    plain = Admin(console.url, token=None)
    for i in range(3):
        reply = plain.call(
            "POST",
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": f"call {i}"}]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert reply.status == 200
    expected = admin.ok("GET", f"/admin/accounts/{account_id}/usage/summary?group_by=model")
    by_day = admin.ok("GET", f"/admin/accounts/{account_id}/usage/summary?group_by=day")
    assert expected["total"]["calls"] == 3
    page = context.new_page()
    _login(page, console.url, ADMIN_TOKEN)
    page.goto(f"{console.url}/console/accounts/{account_id}")
    page.wait_for_selector("#usage-chart canvas")
    assert page.get_attribute("#usage-chart", "data-points") == str(len(by_day["data"]))
    page.wait_for_selector("#model-chart canvas")
    assert page.get_attribute("#model-chart", "data-points") == str(len(expected["data"]))
    cells = page.locator("#by-model tbody tr").first.locator("td").all_inner_texts()
    (row,) = expected["data"]
    assert cells == [
        "m",
        "3",
        str(row["prompt_tokens"]),
        str(row["completion_tokens"]),
        row["cost"],
    ]
    page.screenshot(path=shots / "account-usage.png", full_page=True)
    page.goto(f"{console.url}/console/accounts/{idle_id}")
    assert page.locator("#usage-chart").count() == 0
    assert "No calls in the last 30 days" in page.inner_text("main")


def _chat(url: str, key: str, model: str = "m") -> int:
    reply = Admin(url, token=None).call(
        "POST",
        "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": "hello"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    return reply.status


def test_keys_made_and_revoked_on_the_page_work_and_stop(
    console: Proc, context: BrowserContext, shots: Path
) -> None:
    """A key created on the account page is shown once and calls with it work; its budget and
    spend are in the key list after a call; revoked there, calls with it are refused (401)
    on the data plane. Subscribing on the page lets the account call a model."""
    admin = Admin(console.url)
    account_id = admin.create_account()
    admin.topup(account_id, "5.00")
    page = context.new_page()
    _login(page, console.url, ADMIN_TOKEN)
    page.goto(f"{console.url}/console/accounts/{account_id}")
    page.select_option("#model", "m")
    page.click("#subscribe button")
    page.wait_for_load_state()
    assert admin.account(account_id)["subscriptions"] == ["m"]
    page.fill("#key-name", "from the console")
    page.fill("#budget-amount", "1.00")
    page.select_option("select[name=budget_period]", "day")
    page.click("#new-key button")
    page.wait_for_load_state()
    secret = page.inner_text("#created-key code.secret").strip()
    key_id = secret.split(".")[1]
    assert _chat(console.url, secret) == 200
    page.goto(f"{console.url}/console/accounts/{account_id}")
    assert page.locator("#created-key").count() == 0  # shown that once only
    row = page.locator(f"#key-list tr[data-key='{key_id}']")
    spent = admin.key(account_id, secret)["spend"]["spent"]
    assert spent != "0.000000"
    cells = row.locator("td").all_inner_texts()
    assert cells[1] == "from the console"
    assert cells[2] == "1.000000 / day"
    assert cells[3] == spent
    assert page.locator("#recent-calls tbody tr").count() == 1
    page.screenshot(path=shots / "account-keys.png", full_page=True)
    row.locator("button").click()
    page.wait_for_load_state()
    assert "revoked" in page.locator(f"#key-list tr[data-key='{key_id}']").inner_text()
    assert _chat(console.url, secret) == 401


def test_the_overview_and_the_prices_pages(
    console: Proc, context: BrowserContext, shots: Path
) -> None:
    """The overview's totals are the gateway's own /metrics sums (calls answered, errors,
    amount billed) and its chart is drawn; the prices page shows the sheet in force as
    GET /admin/prices does. An owner can see neither."""
    admin = Admin(console.url)
    account_id, key = admin.funded(["m"], amount="5.00")
    assert _chat(console.url, key) == 200
    assert _chat(console.url, key, model="nope") == 404
    page = context.new_page()
    _login(page, console.url, ADMIN_TOKEN)
    page.goto(f"{console.url}/console/overview")
    metrics = Admin(console.url, token=None).call("GET", "/metrics").body.decode()
    calls = errors = billed = 0.0
    for line in metrics.splitlines():
        if line.startswith("gateway_requests_total{"):
            value = float(line.rsplit(" ", 1)[1])
            calls += value
            errors += value if 'status="2' not in line else 0
        elif line.startswith("gateway_billed_micros_total{"):
            billed += float(line.rsplit(" ", 1)[1])
    assert page.inner_text("#total-calls") == str(int(calls))
    assert page.inner_text("#total-errors") == str(int(errors))
    assert micros(page.inner_text("#total-billed")) == int(billed) > 0
    page.wait_for_selector("#overview-chart canvas")
    assert int(page.get_attribute("#overview-chart", "data-points") or 0) >= 1
    page.screenshot(path=shots / "overview.png", full_page=True)
    page.goto(f"{console.url}/console/prices")
    (entry,) = [m for m in admin.ok("GET", "/admin/prices")["data"] if m["model"] == "m"]
    cells = page.locator("#model-m tr.current td").all_inner_texts()
    assert cells[2:4] == [
        entry["current"]["input_per_million"],
        entry["current"]["output_per_million"],
    ]
    page.screenshot(path=shots / "prices.png", full_page=True)
    owner = context.browser.new_context() if context.browser else None
    assert owner is not None
    try:
        owner_page = owner.new_page()
        _login(owner_page, console.url, key)
        for path in ("/console/overview", "/console/prices"):
            answer = owner_page.goto(console.url + path)
            assert answer is not None
            assert answer.status == 403
    finally:
        owner.close()
    assert account_id


def test_an_owner_reads_their_statement_and_not_anothers(
    console: Proc, context: BrowserContext, shots: Path
) -> None:
    """The owner's statement page for this month is the admin API's statement (opening,
    top-ups, usage, closing; reconciled); another account's statement is refused, and a month
    that is not YYYY-MM is a sentence, not a traceback."""
    admin = Admin(console.url)
    account_id, key = admin.funded(["m"], amount="3.00")
    other_id, _ = admin.funded(["m"], amount="3.00")
    assert _chat(console.url, key) == 200
    page = context.new_page()
    _login(page, console.url, key)
    page.click("#statement-form button")
    page.wait_for_load_state()
    month = page.url.rsplit("month=", 1)[1]
    expected = admin.ok("GET", f"/admin/accounts/{account_id}/statements/{month}")
    assert page.inner_text("#opening") == expected["opening_balance"]
    assert page.inner_text("#topups-total") == expected["topups_total"]
    assert page.inner_text("#usage-total") == "-" + expected["usage_total"]
    assert page.inner_text("#closing") == expected["closing_balance"]
    assert "adds up" in page.inner_text("#reconciles")
    page.screenshot(path=shots / "statement.png", full_page=True)
    refused = page.goto(f"{console.url}/console/accounts/{other_id}/statement?month={month}")
    assert refused is not None
    assert refused.status == 404
    bad = page.goto(f"{console.url}/console/accounts/{account_id}/statement?month=13-2026")
    assert bad is not None
    assert bad.status == 400
    assert "YYYY-MM" in page.inner_text("[role=alert]")


def test_the_console_can_be_turned_off(make_gateway: Callable[..., Proc], mock_a: Proc) -> None:
    """With `console.enabled: false` nothing is served under /console."""
    off = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")], console={"enabled": False}
    )
    plain = Admin(off.url, token=None)
    for path in ("/console", "/console/login", "/console/static/console.css"):
        assert plain.call("GET", path).status == 404


def test_a_frozen_account_shows_its_arrears_timeline(
    make_gateway: Callable[..., Proc], mock_a: Proc, context: BrowserContext, shots: Path
) -> None:
    """An account a call took below zero is frozen: its page says so and shows when its grace
    and its retention end, as the admin API does."""
    # One output token held, while the mock answers 16 when no max_tokens is given: postpaid,
    # the call costs more than the balance that admitted it.
    entry = model_entry("m", mock_a.url, upstream_model="mock-model")
    entry["pricing"] = {"input_per_million": "1", "output_per_million": "100"}
    console = make_gateway([entry], billing={"hold_output_tokens": 1})
    admin = Admin(console.url)
    account_id, key = admin.funded(["m"], amount="0.000150")
    reply = Admin(console.url, token=None).call(
        "POST",
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert reply.status == 200
    for _ in range(100):
        account = admin.account(account_id)
        if account["state"] == "frozen":
            break
        threading.Event().wait(0.05)
    assert account["state"] == "frozen"
    page = context.new_page()
    _login(page, console.url, ADMIN_TOKEN)
    page.goto(f"{console.url}/console/accounts/{account_id}")
    assert "frozen" in page.inner_text("#state")
    timeline = page.inner_text("ol.timeline")
    assert account["grace_ends_at"] in timeline
    assert account["retention_ends_at"] in timeline
    assert page.inner_text("#balance").startswith(account["balance"])
    page.screenshot(path=shots / "account-frozen.png", full_page=True)


def test_the_account_list_pages_through_a_prefix(console: Proc, context: BrowserContext) -> None:
    """A search with more matches than a page has a next page, which holds the rest; together
    they are every account of the prefix, once each."""
    admin = Admin(console.url)
    prefix = "pg" + uuid.uuid4().hex[:8]
    made = {admin.create_account(f"{prefix}-{i:02d}") for i in range(55)}
    page = context.new_page()
    _login(page, console.url, ADMIN_TOKEN)
    page.goto(f"{console.url}/console/accounts?prefix={prefix}")
    seen = page.locator("#accounts tbody td:first-child a").all_inner_texts()
    assert len(seen) == 50
    page.click("a[rel=next]")
    page.wait_for_load_state()
    rest = page.locator("#accounts tbody td:first-child a").all_inner_texts()
    assert sorted(seen + rest) == sorted(made)
    assert page.locator("a[rel=next]").count() in (0, 1)


def test_an_owners_login_ends_with_its_key(console: Proc, context: BrowserContext) -> None:
    """An owner's console login lasts only while the key it was made with works: once the key
    is revoked, the next page is the login page."""
    admin = Admin(console.url)
    account_id, key = admin.funded(["m"], amount="1.00")
    page = context.new_page()
    _login(page, console.url, key)
    assert page.url.endswith(f"/console/accounts/{account_id}")
    admin.ok("DELETE", f"/admin/accounts/{account_id}/keys/{key.split('.')[1]}")
    page.goto(f"{console.url}/console/accounts/{account_id}")
    assert page.url.endswith("/console/login")
