"""Issue 19, points 3 and 4: nobody is locked out of the admin page, and opening the pages to
the reading room is one step.

- the first user is an administrator whatever the form says; the last administrator can be
  neither demoted nor removed (409, and the page shows why); the pages say how to get a lost
  administrator password back;
- users added on the admin page count as [[users]] do for serving HTTP beyond loopback
  (`pacsd serve --http-bind`), which needs an administrator;
- a cross-site request cannot demote or remove one.

A real pacsd (in-process, or `pacsd serve`), real HTTP clients (requests) and a real Chromium.
"""

from __future__ import annotations

import json
import subprocess
import threading
from urllib.parse import urlsplit

import pytest
import requests
from conftest import browser_errors, pacsd_cmd, serve, wait_for, write_config
from selenium.webdriver.common.by import By
from test_ui_pages import accept_confirm, log_in, page, text, type_into, wait

from pacsd.web.auth import hash_password

H = {"X-Requested-With": "test"}   # what the pages send (the CSRF guard asks for it)
ANN = ("ann", "ann-password")
BOB = ("bob", "bob-password")


def add(url: str, name: str, password: str, admin: bool, auth=None) -> requests.Response:
    return requests.post(f"{url}/api/users", json={"name": name, "password": password,
                                                   "admin": admin},
                         headers=H, auth=auth, timeout=30)


def users(url: str, auth) -> dict[str, bool]:
    r = requests.get(f"{url}/api/users", auth=auth, timeout=30)
    assert r.status_code == 200, r.text
    return {u["name"]: u["admin"] for u in r.json()}


def set_admin(url: str, name: str, admin: bool, auth) -> requests.Response:
    return requests.put(f"{url}/api/users/{name}", json={"admin": admin}, headers=H, auth=auth,
                        timeout=30)


# --- HTTP -------------------------------------------------------------------------------------

def test_the_first_user_is_an_administrator_whatever_the_form_says(make_server):
    server = make_server(qr_clients=False)
    url = server.http_url
    r = add(url, *ANN, admin=False)   # no users yet: open, and the form says "not admin"
    assert r.status_code == 201, r.text
    assert r.json()["admin"] is True and "first user" in r.json()["note"]
    # Log-in is on now, and ann runs the admin page.
    assert requests.get(f"{url}/api/users", timeout=30).status_code == 401
    assert users(url, ANN) == {"ann": True}
    assert requests.get(f"{url}/api/log", auth=ANN, timeout=30).status_code == 200
    # A second user is what the form says.
    assert add(url, *BOB, admin=False, auth=ANN).json()["admin"] is False
    assert users(url, ANN) == {"ann": True, "bob": False}


def test_the_last_administrator_is_neither_demoted_nor_removed(make_server):
    server = make_server(qr_clients=False)
    url = server.http_url
    add(url, *ANN, admin=True)
    add(url, *BOB, admin=False, auth=ANN)

    for r in (set_admin(url, "ann", False, ANN),
              requests.delete(f"{url}/api/users/ann", headers=H, auth=ANN, timeout=30)):
        assert r.status_code == 409, r.text
        assert "'ann' is the last administrator" in r.json()["error"]
    assert users(url, ANN) == {"ann": True, "bob": False}
    # A password change keeps the role (the rule is about the role only).
    assert requests.put(f"{url}/api/users/ann", json={"password": "ann-password-2"}, headers=H,
                        auth=ANN, timeout=30).status_code == 200
    ann = ("ann", "ann-password-2")

    # With a second administrator, the first may go; then the second is the last.
    assert set_admin(url, "bob", True, ann).status_code == 200
    assert set_admin(url, "ann", False, BOB).status_code == 200
    assert requests.delete(f"{url}/api/users/bob", headers=H, auth=BOB,
                           timeout=30).status_code == 409
    assert users(url, BOB) == {"ann": False, "bob": True}


def test_two_administrators_demoting_each_other_at_once_leave_one(make_server):
    """The check runs inside the index write (one writer): both cannot pass it."""
    server = make_server(qr_clients=False)
    url = server.http_url
    add(url, *ANN, admin=True)
    add(url, *BOB, admin=True, auth=ANN)
    for round_ in range(5):
        codes: list[int] = []
        start = threading.Barrier(2)

        def demote(name: str, auth) -> None:
            start.wait(10)
            codes.append(set_admin(url, name, False, auth).status_code)
        threads = [threading.Thread(target=demote, args=("bob", ANN)),
                   threading.Thread(target=demote, args=("ann", BOB))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        admins = admins_now(url)
        assert len(admins) == 1, (round_, codes, admins)
        assert sorted(codes) in ([200, 403], [200, 409]), codes   # 403: demoted meanwhile
        # Both administrators again for the next round.
        winner = ANN if admins == ["ann"] else BOB
        assert set_admin(url, "bob" if winner == ANN else "ann", True, winner).status_code == 200


def admins_now(url: str) -> list[str]:
    for auth in (ANN, BOB):
        r = requests.get(f"{url}/api/users", auth=auth, timeout=30)
        if r.status_code == 200:
            return sorted(u["name"] for u in r.json() if u["admin"])
    raise AssertionError("neither ann nor bob may read the users")


def test_a_configured_administrator_counts(make_server):
    """A [[users]] administrator in the file is one too: the page's last one may go."""
    root = {"name": "root", "password_hash": hash_password("root-secret"), "admin": True}
    server = make_server(qr_clients=False, users=[root])
    url = server.http_url
    boss = ("root", "root-secret")
    assert add(url, *ANN, admin=True, auth=boss).status_code == 201
    assert set_admin(url, "ann", False, boss).status_code == 200
    assert requests.delete(f"{url}/api/users/ann", headers=H, auth=boss,
                           timeout=30).status_code == 200
    r = requests.delete(f"{url}/api/users/root", headers=H, auth=boss, timeout=30)
    assert r.status_code == 409 and "config file" in r.json()["error"]


def test_a_cross_site_request_cannot_demote_or_remove(make_server):
    """Attack: another site's page driving a logged-in administrator's browser. Its form
    posts carry its Origin (and no X-Requested-With); refused with 403, nothing changed."""
    server = make_server(qr_clients=False)
    url = server.http_url
    add(url, *ANN, admin=True)
    add(url, *BOB, admin=True, auth=ANN)
    s = requests.Session()
    assert s.post(f"{url}/app/login", json={"name": "ann", "password": "ann-password"},
                  timeout=30).status_code == 200
    evil = {"Origin": "http://evil.example", "Referer": "http://evil.example/x"}
    attempts = [
        ("PUT", "/api/users/bob", {**evil, **H}, '{"admin": false}', "application/json"),
        ("DELETE", "/api/users/bob", {**evil, **H}, "", ""),
        ("POST", "/api/users", evil, "name=eve&password=eve-password&admin=1",
         "application/x-www-form-urlencoded"),
        # Same origin but no X-Requested-With: what a form or a no-cors fetch can send.
        ("PUT", "/api/users/bob", {}, '{"admin": false}', "text/plain"),
        ("DELETE", "/api/users/bob", {}, "", ""),
    ]
    for method, path, headers, body, ctype in attempts:
        r = s.request(method, url + path, data=body,
                      headers={**headers, **({"Content-Type": ctype} if ctype else {})},
                      timeout=30)
        assert r.status_code == 403, (method, path, headers, r.status_code, r.text)
    assert users(url, ANN) == {"ann": True, "bob": True}
    # The same session with the pages' header and no foreign Origin works: the refusals above
    # were the guard's, not the session's.
    assert s.put(f"{url}/api/users/bob", json={"admin": False}, headers=H,
                 timeout=30).status_code == 200


# --- HTTP beyond loopback: `pacsd serve --http-bind` ---------------------------------------------

def test_http_bind_needs_an_administrator_and_says_how(tmp_path):
    data = tmp_path / "d"
    cfg = write_config(tmp_path / "c.toml", data, qr_clients=False)
    r = subprocess.run(pacsd_cmd("serve", "--config", str(cfg), "--http-bind", "0.0.0.0"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 78, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert "'0.0.0.0'" in last and "no administrator" in last and "pacsd passwd" in last, last
    assert not (data / "pacsd.json").exists()
    # [[users]] without an administrator is refused too: nobody could run the admin page.
    cfg = write_config(tmp_path / "c2.toml", data, qr_clients=False, users=[
        {"name": "reader", "password_hash": hash_password("reader-secret"), "admin": False}])
    r = subprocess.run(pacsd_cmd("serve", "--config", str(cfg), "--http-bind", "0.0.0.0"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 78 and "no administrator" in r.stderr, r.stderr


def test_users_without_an_administrator_are_told_how_to_get_one(make_server, caplog):
    """A data folder from before (log-in on, nobody an administrator): said at start."""
    make_server(qr_clients=False, users=[
        {"name": "reader", "password_hash": hash_password("reader-secret"), "admin": False}])
    said = [r.getMessage() for r in caplog.records if r.name == "pacsd.accounts"]
    assert len(said) == 1 and "no administrator" in said[0] and "pacsd passwd" in said[0], said


def test_an_administrator_added_on_the_admin_page_opens_http_to_the_network(tmp_path, browser):
    """The recipe of docs/security.md: add the first user on the admin page (loopback), then
    `pacsd serve --http-bind 0.0.0.0`; the pages then ask to log in, and the administrator
    runs the admin page. Only 127.0.0.1 is contacted."""
    data = tmp_path / "d"
    cfg = write_config(tmp_path / "c.toml", data, qr_clients=False)
    with serve(cfg, data) as p:
        assert add(p.http_url, *ANN, admin=False).json()["admin"] is True
    with serve(cfg, data, "--http-bind", "0.0.0.0") as p:
        run = json.loads((data / "pacsd.json").read_text())
        assert run["http_bind"] == "0.0.0.0"
        assert requests.get(f"{p.http_url}/api/users", timeout=30).status_code == 401
        assert users(p.http_url, ANN) == {"ann": True}
        r = requests.get(f"{p.http_url}/app/", allow_redirects=False, timeout=30)
        assert r.status_code == 302 and "login" in r.headers["Location"]
        browser.get(p.http_url + "/app/admin")
        log_in(browser, "ann", "ann-password")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#users tr[data-name="ann"]'))
        assert "administrator" in text(browser, '#users tr[data-name="ann"]')
        assert not browser.find_element(By.ID, "denied").is_displayed()


# --- the admin page in Chromium -----------------------------------------------------------------

def test_admin_page_first_user_last_admin_and_recovery_hint(make_server, browser):
    server = make_server(qr_clients=False)
    page(browser, server, "admin")
    wait(browser, lambda d: d.find_element(By.ID, "first-user-note").is_displayed())
    assert "first user is always an administrator" in text(browser, "#first-user-note")
    admin_box = browser.find_element(By.ID, "u-admin")
    assert admin_box.is_selected() and not admin_box.is_enabled()
    assert "pacsd passwd NAME --admin" in text(browser, "#recover-hint")

    # Even a form that says "not an administrator" (a changed page, an old one) makes one.
    browser.execute_script("const b = document.getElementById('u-admin');"
                           "b.disabled = false; b.checked = false;")
    type_into(browser, "#u-name", "ann")
    type_into(browser, "#u-password", "ann-password")
    browser.find_element(By.ID, "user-add").click()
    # Log-in is on now: the page sends us to log in, and back to the admin page after.
    log_in(browser, "ann", "ann-password")
    wait(browser, lambda d: urlsplit(d.current_url).path == "/app/admin")
    row = '#users tr[data-name="ann"]'
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row))
    assert "administrator" in text(browser, row)
    assert not browser.find_element(By.ID, "denied").is_displayed()

    # The last administrator: "Make user" and "Remove" are refused, and the page says why.
    browser.find_element(By.CSS_SELECTOR, row + ' [data-act="toggle-admin"]').click()
    wait(browser, lambda d: d.find_element(By.ID, "users-error").is_displayed())
    assert "last administrator" in text(browser, "#users-error")
    browser.find_element(By.CSS_SELECTOR, row + ' [data-act="remove"]').click()
    accept_confirm(browser)
    wait(browser, lambda d: "last administrator" in text(d, "#users-error"))
    assert users(server.http_url, ANN) == {"ann": True}

    # The login page says how to get a lost administrator password back.
    browser.find_element(By.ID, "logout").click()
    wait(browser, lambda d: "/app/login" in d.current_url)
    browser.find_element(By.CSS_SELECTOR, "#recover-hint summary").click()
    wait(browser, lambda d: "pacsd passwd NAME --admin" in text(d, "#recover-hint"))
    # Only the two refusals, as the console notes every 4xx answer; no script error.
    errors = browser_errors(browser)
    assert [e for e in errors if "status of 409" not in e] == [], errors


def test_a_user_added_while_logged_in_keeps_the_role_asked(make_server, browser):
    server = make_server(qr_clients=False)
    add(server.http_url, *ANN, admin=True)
    page(browser, server, "admin")
    log_in(browser, "ann", "ann-password")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#users tr[data-name="ann"]'))
    assert browser.find_element(By.ID, "u-admin").is_enabled()
    type_into(browser, "#u-name", "bob")
    type_into(browser, "#u-password", "bob-password")
    browser.find_element(By.ID, "user-add").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#users tr[data-name="bob"]'))
    assert "administrator" not in text(browser, '#users tr[data-name="bob"]')


@pytest.mark.parametrize("engine", ["firefox", "webkit"])
def test_no_lock_out_in_the_other_engines(engine, request, make_server):
    """The first user and the last administrator in Firefox (Gecko) and WebKit."""
    page_ = request.getfixturevalue(engine)
    server = make_server(qr_clients=False)
    page_.get(server.http_url + "/app/admin")
    page_.wait("const n = document.getElementById('first-user-note');"
               "return n && !n.classList.contains('hidden') && "
               "document.getElementById('u-admin').disabled", message="the first-user note")
    assert "pacsd passwd NAME --admin" in page_.js(
        "return document.getElementById('recover-hint').textContent")
    page_.type("#u-name", "ann")
    page_.type("#u-password", "ann-password")
    page_.click("#user-add")
    page_.wait("return location.pathname.endsWith('/app/login')", message="sent to log in")
    page_.type("#name", "ann")
    page_.type("#password", "ann-password")
    page_.click("#login-btn")
    row = "#users tr[data-name=\"ann\"]"
    page_.wait(f"const r = document.querySelector('{row}');"
               "return r && r.textContent.includes('administrator')",
               message="ann, an administrator, on the admin page")
    page_.click(f"{row} [data-act=\"toggle-admin\"]")
    page_.wait("const e = document.getElementById('users-error');"
               "return !e.classList.contains('hidden') && "
               "e.textContent.includes('last administrator')", message="the refusal shown")
    assert users(server.http_url, ANN) == {"ann": True}


ATTACK_PAGE = """<!DOCTYPE html><html><body>
<form id="f" method="post" action="%(target)s/api/users" target="sink">
  <input name="name" value="eve"><input name="password" value="eve-password">
  <input name="admin" value="true"></form>
<iframe name="sink"></iframe>
<script>
window.results = {};
const target = "%(target)s";
async function attempt(label, url, init) {
  try { const r = await fetch(url, init); window.results[label] = "status " + r.status; }
  catch (e) { window.results[label] = "blocked"; }
}
(async () => {
  await attempt("demote", target + "/api/users/bob", {method: "PUT", credentials: "include",
    headers: {"Content-Type": "application/json", "X-Requested-With": "x"},
    body: JSON.stringify({admin: false})});
  await attempt("remove", target + "/api/users/bob", {method: "DELETE", credentials: "include",
    headers: {"X-Requested-With": "x"}});
  await attempt("no-cors", target + "/api/users", {method: "POST", mode: "no-cors",
    credentials: "include", headers: {"Content-Type": "text/plain"},
    body: JSON.stringify({name: "eve", password: "eve-password", admin: true})});
  document.getElementById("f").submit();
  window.results.form = "sent";
})();
</script></body></html>"""


def test_another_site_s_page_cannot_demote_or_remove_in_a_real_browser(make_server, browser,
                                                                        tmp_path, caplog):
    """Attack in Chromium: an administrator logged in to pacsd opens another site's page (on
    the same host, another port: same-site, so even SameSite=Lax cookies go along). Its
    scripted PUT/DELETE need a CORS preflight pacsd never grants; its no-cors POST and its
    form post carry the foreign Origin: the guard answers 403. Nothing changes."""
    import http.server
    import socketserver
    server = make_server(qr_clients=False)
    url = server.http_url
    add(url, *ANN, admin=True)
    add(url, *BOB, admin=True, auth=ANN)
    page(browser, server, "admin")
    log_in(browser, "ann", "ann-password")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#users tr[data-name="bob"]'))

    site = tmp_path / "evil"
    site.mkdir()
    (site / "attack.html").write_text(ATTACK_PAGE % {"target": url})
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(site), **kw)
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as evil:
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        try:
            browser.get(f"http://127.0.0.1:{evil.server_address[1]}/attack.html")
            results = wait(browser, lambda d: d.execute_script(
                "return window.results && window.results.form && window.results"),
                message="the attack page ran")
            # The no-cors POST and the form post reach pacsd and are refused by the guard.
            refused = wait_for(lambda: len([
                r for r in caplog.records if r.name == "pacsd.web.guard"
                and "POST /api/users" in r.getMessage() and "127.0.0.1:" in r.getMessage()
                and "neither this server" in r.getMessage()]) >= 2, 30,
                "the guard's two refusals")
            assert refused
        finally:
            evil.shutdown()
    assert results["demote"] == "blocked" and results["remove"] == "blocked", results
    assert results["no-cors"] == "status 0", results   # opaque: sent, answer unreadable
    assert users(url, ANN) == {"ann": True, "bob": True}
