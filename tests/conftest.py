"""Fixtures: real pacsd servers on port 0 / 127.0.0.1, real peers, readiness polled.

PACSD_REQUIRE_PEERS=1 (set by .ci/run) turns "DCMTK is not installed" from a skip into a
failure.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from postgres import (  # tests/postgres.py
    PostgresMissing,
    PostgresServer,
    postgres_bindir,
    postgres_database,
    throwaway_cluster,
)

from pacsd import config as config_mod  # noqa: E402
from pacsd.daemon.server import Server  # noqa: E402

REQUIRE_PEERS = os.environ.get("PACSD_REQUIRE_PEERS") == "1"


def peer_missing(message: str) -> NoReturn:
    """A real peer (tool, browser, kernel feature) is missing: a skip on a developer's machine,
    a failure in CI (PACSD_REQUIRE_PEERS=1), where a skipped test must never pass for one."""
    if REQUIRE_PEERS:
        pytest.fail(message + " and PACSD_REQUIRE_PEERS=1")
    pytest.skip(message)


LOCAL = "127.0.0.1"


def dcmtk(tool: str, package: str = "dcmtk") -> str:
    """Absolute path of a DCMTK (or other packaged peer) tool; pynetdicom installs look-alikes
    into the venv's bin/, so only system folders count."""
    for folder in ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin"):
        path = Path(folder) / tool
        if path.exists():
            return str(path)
    peer_missing(f"{package}'s {tool} is not installed (apt-get install {package})")


def peer_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle's algorithm on unless told otherwise.
    return {**os.environ, "TCP_NODELAY": "1"}


def run_peer(args: list[str], timeout: float = 120, check: bool = True
             ) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=peer_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args[:1])} exited {proc.returncode}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def toml_value(v) -> str:
    """A value in TOML: JSON's notation, but tables inline ({ key = value })."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}"
                                for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


# The calling AE titles the tests query and retrieve as (pynetdicom's default in `associate`,
# DCMTK's findscu / getscu / movescu defaults). Since C-FIND, C-GET and C-MOVE are for nodes only
# ([dicom] open_query_retrieve = false), write_config registers them as nodes on this machine,
# as a site registers its workstations. Port 104: a workstation's store SCP; none listens here.
QR_CLIENTS = ("PYNETDICOM", "FINDSCU", "GETSCU", "MOVESCU")


def client_nodes(nodes: list[dict]) -> list[dict]:
    """QR_CLIENTS as nodes on 127.0.0.1, except those `nodes` already has."""
    taken = {str(n.get("aet", "")).strip() for n in nodes} | {str(n.get("name") or "")
                                                               for n in nodes}
    return [{"name": aet, "aet": aet, "host": LOCAL, "port": 104}
            for aet in QR_CLIENTS if aet not in taken]


def write_config(path: Path, data: Path, nodes: list[dict] | None = None,
                 users: list[dict] | None = None, qr_clients: bool = True, **sections) -> Path:
    """A TOML config: sections as {"dicom": {"port": 0}} etc. ("plugin.hl7" for a nested
    table), a list for an array of tables ({"routes": [{...}, ...]}), plus [[nodes]] and
    [[users]]. Unless `qr_clients` is False, the test clients (QR_CLIENTS) are nodes too."""
    nodes = list(nodes or [])
    if qr_clients:
        nodes += client_nodes(nodes)
    lines = ["[server]", f'data = "{data}"']
    lines += [f"{k} = {toml_value(v)}" for k, v in sections.pop("server", {}).items()]
    sections.setdefault("dicom", {})
    sections["dicom"] = {"port": 0, "bind": LOCAL, **sections["dicom"]}
    sections["http"] = {"port": 0, **sections.get("http", {})}
    sections.setdefault("log", {"file": "-"})
    arrays = {"nodes": nodes or [], "users": users or []}
    for name, table in sections.items():
        if isinstance(table, list):
            arrays[name] = table
            continue
        lines.append(f"[{name}]")
        for k, v in table.items():
            lines.append(f"{k} = {toml_value(v)}")
    for table, items in arrays.items():
        for item in items:
            lines.append(f"[[{table}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def make_server(tmp_path: Path):
    """Start an in-process pacsd (one at a time per process): make_server(nodes=[...], dicom={...})."""
    servers: list[Server] = []

    def start(data: Path | None = None, **kw) -> Server:
        data = data or tmp_path / "pacsd"
        # In-process servers keep the DICOM side in this process, where tests look at it
        # (server.dicom); `pacsd serve` (serve() below) runs with its default, one DICOM
        # worker process per core, and tests/test_workers.py puts workers in-process too.
        kw["dicom"] = {"workers": 1, **kw.get("dicom", {})}
        cfg_file = write_config(tmp_path / f"pacsd{len(servers)}.toml", data, **kw)
        server = Server(config_mod.load(cfg_file, env={})).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server) -> Server:
    return make_server()


# --- pacsd serve as a real subprocess ---------------------------------------------------------

class Process:
    def __init__(self, proc: subprocess.Popen, data: Path, log: Path) -> None:
        self.proc, self.data, self.log = proc, data, log
        self.port = 0
        self.http_url = ""

    def wait_ready(self, timeout: float = 30) -> "Process":
        deadline = time.monotonic() + timeout
        runfile = self.data / "pacsd.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pacsd exited {self.proc.returncode}:\n{self.output()}")
            try:
                info = json.loads(runfile.read_text())
                if info["pid"] == self.proc.pid:
                    self.port = int(info["dicom_port"])
                    self.http_url = f"{info['http_scheme']}://{LOCAL}:{info['http_port']}"
                    return self
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"pacsd not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log.read_text()[-5000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> int:
        return terminate(self.proc, timeout)


def terminate(proc: subprocess.Popen, timeout: float = 10) -> int:
    """SIGTERM, then SIGKILL if it has not gone within `timeout`; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def pacsd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pacsd", *args]


@contextmanager
def serve(config: Path, data: Path, *extra: str, log_name: str = "serve.log",
          env: dict[str, str] | None = None) -> Iterator[Process]:
    """`pacsd serve` until ready; `env` is added to (not instead of) ours."""
    log = data.parent / log_name
    with open(log, "ab") as out:
        proc = subprocess.Popen(pacsd_cmd("serve", "--config", str(config), *extra),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env} if env else None)
    p = Process(proc, data, log)
    try:
        yield p.wait_ready()
    finally:
        p.stop()


# --- pynetdicom as SCU ------------------------------------------------------------------------

@contextmanager
def associate(port: int, contexts, aet: str = "PYNETDICOM", called: str = "PACSD",
              ext_neg=None, evt_handlers=None):
    from pynetdicom import AE
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts:
        ae.add_requested_context(*cx) if isinstance(cx, tuple) else ae.requested_contexts.append(cx)
    # Like every real client should: without TCP_NODELAY each small PDU waits for a delayed ACK.
    from pacsd.nodes.remote import nodelay
    from pynetdicom import evt
    handlers = [(evt.EVT_CONN_OPEN, nodelay)] + list(evt_handlers or [])
    assoc = ae.associate(LOCAL, port, ae_title=called, ext_neg=ext_neg, evt_handlers=handlers)
    assert assoc.is_established, "association was not accepted"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def store_files(port: int, paths: list[Path], aet: str = "PYNETDICOM") -> list[int]:
    """C-STORE each file's bytes unchanged (sent by path, raw) over one association, proposing
    each file's own (SOP class, transfer syntax); return the statuses."""
    from pydicom import dcmread
    from pynetdicom import _config, build_context
    _config.STORE_SEND_CHUNKED_DATASET = True
    metas = [dcmread(p, stop_before_pixels=True) for p in paths]
    # Sent raw, the request's SOP Class comes from the File Meta group.
    pairs = sorted({(str(m.file_meta.MediaStorageSOPClassUID), str(m.file_meta.TransferSyntaxUID))
                    for m in metas})
    contexts = [build_context(c, [ts]) for c, ts in pairs]
    statuses = []
    with associate(port, contexts, aet=aet) as assoc:
        for p in paths:
            rsp = assoc.send_c_store(p)
            statuses.append(int(rsp.Status) if rsp else -1)
    return statuses


def c_get(port: int, keys: dict[str, str], sop_class: str, ts: str
          ) -> tuple[int, dict[str, tuple[str, bytes]]]:
    """Study Root C-GET proposing one (class, syntax) with SCP role selection; returns the final
    status and what was received: {SOP Instance UID: (transfer syntax, data set bytes)}."""
    from pydicom.dataset import Dataset
    from pynetdicom import build_context, evt
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event):
        received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax), event.encoded_dataset(include_meta=False))
        return 0x0000

    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = sop_class, False, True
    with associate(port, [build_context(GET), build_context(sop_class, [ts])], ext_neg=[role],
                   evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        q = Dataset()
        for k, v in keys.items():
            setattr(q, k, v)
        final = list(assoc.send_c_get(q, GET))[-1][0]
    return int(final.Status), received


def c_find(port: int, level: str, model=None, **keys) -> tuple[int, list]:
    """(final status, matches) of a C-FIND (Study Root unless `model`); keys: keyword=value,
    '' for return-only keys."""
    from pydicom.dataset import Dataset
    from pynetdicom import build_context
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
    model = model or StudyRootQueryRetrieveInformationModelFind
    q = Dataset()
    q.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(q, k, v)
    with associate(port, [build_context(model)]) as assoc:
        out = list(assoc.send_c_find(q, model))
    matches = [ds for status, ds in out if status and status.Status in (0xFF00, 0xFF01)]
    return int(out[-1][0].Status), matches


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.05) -> object:
    """Poll `predicate` until it returns something true (returned); AssertionError naming
    `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def which(name: str) -> str | None:
    return shutil.which(name)


# --- a real headless Chromium (Debian's chromium + chromium-driver) driven by Selenium --------

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _first(paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if Path(p).exists()), None)


@pytest.fixture(scope="session")
def chromium_paths() -> tuple[str, str]:
    binary, driver = _first(CHROMIUM), _first(CHROMEDRIVER)
    if not binary or not driver:
        peer_missing("Chromium and ChromeDriver are not installed (apt-get install chromium "
                     "chromium-driver)")
    return binary, driver


@pytest.fixture
def browser(chromium_paths, tmp_path: Path):
    """A fresh headless Chromium per test (own profile, downloads into tmp_path/downloads).
    Only loopback is ever contacted: background networking, sync and updates are off."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary, driver_path = chromium_paths
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-extensions",
                 "--disable-dev-shm-usage", "--window-size=1400,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False,
        "safebrowsing.enabled": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    drv.set_page_load_timeout(30)
    drv.set_script_timeout(60)
    drv.downloads = downloads   # type: ignore[attr-defined]
    try:
        yield drv
    finally:
        drv.quit()


def browser_errors(drv) -> list[str]:
    """Severe messages from the page's console (uncaught exceptions, failed requests)."""
    return [e["message"] for e in drv.get_log("browser") if e.get("level") == "SEVERE"]


# --- the other engines: Firefox (Gecko, via Marionette) and WebKitGTK (Safari's engine) -------

class EnginePage:
    """The few things the cross-engine tests do, the same way in every engine."""

    name = ""

    def get(self, url: str) -> None: ...
    def js(self, script: str, *args): ...   # a function body: `return ...`
    def click(self, css: str) -> None: ...
    def type(self, css: str, text: str) -> None: ...
    def png(self) -> bytes: ...
    def url(self) -> str: ...

    def wait(self, script: str, timeout: float = 30, message: str = "") -> object:
        """Poll `script` (a function body returning a value) until it is truthy."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.js(script)
            except Exception as exc:
                # A click that navigates can unload the page while the script runs; every
                # engine says so with "unload" (WebKit: "Callback was not called before the
                # unload event", Gecko: "Document was unloaded"). The next poll sees the new page.
                if "unload" not in str(exc):
                    raise
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: {message or script} not true after {timeout} s "
                             f"(last {value!r})")


class MarionettePage(EnginePage):
    name = "firefox"

    def __init__(self, client) -> None:
        self.m = client

    def get(self, url: str) -> None:
        self.m.navigate(url)

    def js(self, script: str, *args):
        # sandbox=None: the page's own globals (window.pacsViewer), not an Xray view of them.
        return self.m.execute_script(script, script_args=list(args), sandbox=None)

    def click(self, css: str) -> None:
        self.m.find_element("css selector", css).click()

    def type(self, css: str, text: str) -> None:
        self.m.find_element("css selector", css).send_keys(text)

    def png(self) -> bytes:
        return self.m.screenshot(format="binary")

    def url(self) -> str:
        return self.m.get_url()


class SeleniumPage(EnginePage):
    def __init__(self, driver, name: str) -> None:
        self.d, self.name = driver, name

    def get(self, url: str) -> None:
        self.d.get(url)

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By
        self.d.find_element(By.CSS_SELECTOR, css).click()

    def type(self, css: str, text: str) -> None:
        from selenium.webdriver.common.by import By
        self.d.find_element(By.CSS_SELECTOR, css).send_keys(text)

    def png(self) -> bytes:
        return self.d.get_screenshot_as_png()

    def url(self) -> str:
        return self.d.current_url


@pytest.fixture
def firefox(tmp_path: Path):
    """Firefox ESR, headless, driven over Marionette (Mozilla's own protocol; geckodriver is
    only a proxy for it). A fresh profile that never calls home."""
    binary = _first(("/usr/bin/firefox-esr", "/usr/bin/firefox"))
    try:
        from marionette_driver.marionette import Marionette
    except ImportError:
        Marionette = None
    if not binary or Marionette is None:
        peer_missing("Firefox (apt-get install firefox-esr) or marionette-driver is missing")
    port = free_port()
    profile = tmp_path / "firefox-profile"
    profile.mkdir()
    prefs = {"marionette.port": port, "browser.shell.checkDefaultBrowser": False,
             "app.update.disabledForTesting": True, "app.normandy.enabled": False,
             "datareporting.policy.dataSubmissionEnabled": False,
             "toolkit.telemetry.enabled": False, "browser.safebrowsing.malware.enabled": False,
             "browser.safebrowsing.phishing.enabled": False,
             "extensions.update.enabled": False, "network.captive-portal-service.enabled": False,
             "network.connectivity-service.enabled": False, "browser.startup.page": 0,
             "browser.startup.homepage": "about:blank", "network.dns.disablePrefetch": True,
             "browser.newtabpage.enabled": False, "media.gmp-manager.url": "",
             "extensions.getAddons.cache.enabled": False, "services.settings.server": "",
             "browser.region.network.url": "", "network.proxy.type": 0}
    (profile / "user.js").write_text("".join(f'user_pref("{k}", {json.dumps(v)});\n'
                                             for k, v in prefs.items()))
    proc = subprocess.Popen([binary, "--headless", "--marionette", "--no-remote", "--profile",
                             str(profile), "--width", "1400", "--height", "900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    client = Marionette(host=LOCAL, port=port, bin=None, startup_timeout=60)
    try:
        client.start_session()
        client.timeout.page_load = 30
        client.timeout.script = 60
        yield MarionettePage(client)
    finally:
        try:
            client.delete_session()
        except Exception:
            pass
        terminate(proc, 15)


@pytest.fixture(scope="session")
def xvfb_display():
    """A virtual X display for WebKitGTK, which has no headless mode of its own."""
    exe = _first(("/usr/bin/Xvfb",))
    if not exe:
        peer_missing("Xvfb is not installed (apt-get install xvfb)")
    read, write = os.pipe()
    proc = subprocess.Popen([exe, "-displayfd", str(write), "-screen", "0", "1400x900x24",
                             "-nolisten", "tcp"], pass_fds=(write,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()   # Xvfb writes its display number once it is ready
    if not number:
        proc.kill()
        raise AssertionError("Xvfb did not start")
    try:
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def webkit(xvfb_display):
    """WebKitGTK's MiniBrowser (WebKit: Safari's engine) driven by WebKitWebDriver."""
    import glob
    driver_path = _first(("/usr/bin/WebKitWebDriver",))
    browsers = sorted(glob.glob("/usr/lib/*/webkit2gtk-4.*/MiniBrowser"))
    if not driver_path or not browsers:
        peer_missing("WebKitGTK's driver is not installed (apt-get install webkit2gtk-driver)")
    from selenium import webdriver
    from selenium.webdriver.webkitgtk.options import Options
    from selenium.webdriver.webkitgtk.service import Service
    opts = Options()
    opts.binary_location = browsers[-1]
    opts.add_argument("--automation")
    env = {**os.environ, "DISPLAY": xvfb_display}
    drv = webdriver.WebKitGTK(options=opts, service=Service(executable_path=driver_path, env=env))
    drv.set_window_size(1400, 900)
    drv.set_page_load_timeout(30)
    drv.set_script_timeout(60)
    try:
        yield SeleniumPage(drv, "webkit")
    finally:
        drv.quit()


@contextmanager
def remote_pacsd(tmp_path: Path, files: list[Path], local_aet: str = "LOCALPACS",
                 remote_aet: str = "REMOTE") -> Iterator[tuple[Process, int]]:
    """A second pacsd (`pacsd serve`) holding `files`, which knows us as `local_aet` on a port
    chosen here: yields (the remote, the DICOM port the local pacsd must then listen on)."""
    local_port = free_port()
    data = tmp_path / "remote"
    cfg = write_config(tmp_path / "remote.toml", data, dicom={"aet": remote_aet},
                       nodes=[{"name": "here", "aet": local_aet, "host": LOCAL,
                               "port": local_port}])
    with serve(cfg, data, log_name="remote.log") as remote:
        assert store_files(remote.port, files) == [0] * len(files)
        yield remote, local_port


# --- a real, throw-away PostgreSQL server (the index's other backend) -------------------------
#
# PACSD_TEST_POSTGRES=postgresql://USER@HOST:PORT/DB uses an existing server instead (its user
# must be allowed to CREATE DATABASE); otherwise one cluster is initdb'd and started per session.

@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server: PACSD_TEST_POSTGRES, or a throw-away cluster on
    127.0.0.1 (trust authentication, user `postgres`, fsync off), stopped and deleted at the
    end (tests/postgres.py)."""
    external = os.environ.get("PACSD_TEST_POSTGRES")
    if external:
        yield PostgresServer(external)
        return
    try:
        bindir = postgres_bindir()
    except PostgresMissing as e:
        peer_missing(str(e))
    with throwaway_cluster(bindir=bindir) as server:
        yield server


@pytest.fixture
def make_postgres_url(postgres_server: PostgresServer):
    """make_postgres_url() -> the URL of another fresh database; all dropped after the test."""
    from contextlib import ExitStack
    with ExitStack() as stack:
        yield lambda: stack.enter_context(postgres_database(postgres_server))


@pytest.fixture
def postgres_url(make_postgres_url) -> str:
    """postgresql://postgres@127.0.0.1:PORT/DBNAME of a fresh, empty database for this test."""
    return make_postgres_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request, tmp_path: Path) -> str:
    """Each index backend in turn: make_server(index={"url": index_url}). PostgreSQL is only
    started for the postgresql runs."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/index.sqlite3"
    return request.getfixturevalue("postgres_url")


# --- test tiers: markers assigned at collection, times per tier at the end ---------------------
#
# Every test is exactly one of
#   unit         in-process: starts no pacsd (in a thread or as a process), no subprocess, no
#                browser, no database server, and opens no listening or outgoing socket
#                (enforced while it runs: see `unit_stays_in_process`);
#   integration  everything else: a real pacsd on port 0 talked to by pynetdicom/requests, a
#                `pacsd ...` subprocess, a socket server of its own;
# and may also be any of these, which say what else it needs:
#   peers        DCMTK, dicom3tools, Orthanc, openssl, systemd-analyze (real command-line peers)
#   browser      Chromium, Firefox or WebKitGTK
#   postgres     a PostgreSQL server (the index's other backend)
#   reliability  tests/reliability/: attacks, storms, exhaustion, kill -9
# Nobody has to remember them: they come from what a test reaches (its fixtures, the helpers it
# calls, followed through tests/: `tiers_of`), from its parameters and its folder; an explicit
# @pytest.mark.<tier> adds to them. The reading errs towards integration; the other way round,
# a test read as unit that starts something fails. `pytest -m unit` is the fast loop, and the
# run ends with each tier's count and seconds (setup + call + teardown).

TIERS = ("unit", "integration", "peers", "browser", "postgres", "reliability")
TESTS = Path(__file__).parent
BROWSER_FIXTURES = {"browser", "firefox", "webkit", "chromium_paths", "xvfb_display"}
POSTGRES_FIXTURES = {"postgres_server", "postgres_url", "make_postgres_url"}
POSTGRES_NAMES = {"throwaway_cluster", "postgres_bindir", "PostgresServer"}
# What a test calls to run a real peer (dcmtk() also finds dicom3tools and systemd-analyze);
# openssl and Orthanc are run by name.
PEER_NAMES = {"dcmtk", "orthanc_binary", "peer_env"}
PEER_PROGRAMS = {"openssl"}
# Anything that starts a pacsd, a process or a socket: not unit.
PROCESS_FIXTURES = {"make_server", "server", "remote_pacsd"}
PROCESS_NAMES = {"Server", "serve", "pacsd_cmd", "remote_pacsd", "Process", "subprocess",
                 "Popen", "associate", "store_files", "c_find", "c_get", "free_port", "socket",
                 "run_peer", "AE", "requests", "urlopen", "make_server"}


def _in_tests(func: types.FunctionType) -> bool:
    return func.__code__.co_filename.startswith(str(TESTS))


_reached: dict[object, tuple[frozenset[str], frozenset[str]]] = {}


def _reach(func) -> tuple[frozenset[str], frozenset[str]]:
    """(names, string constants) that `func` uses, followed through every function and class
    defined in tests/ (the helpers a test calls, their nested functions and methods)."""
    if func in _reached:
        return _reached[func]
    seen: set[int] = set()
    names: set[str] = set()
    strings: set[str] = set()
    todo = [func]
    while todo:
        obj = todo.pop()
        obj = getattr(obj, "__wrapped__", obj)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, type):
            todo += [v for v in vars(obj).values() if inspect.isfunction(v)
                     or isinstance(v, property)]
            continue
        if isinstance(obj, property):
            todo += [f for f in (obj.fget, obj.fset) if f]
            continue
        if not inspect.isfunction(obj) or not _in_tests(obj):
            continue
        codes = [obj.__code__]
        while codes:
            code = codes.pop()
            names.update(code.co_names)
            for c in code.co_consts:
                if isinstance(c, types.CodeType):
                    codes.append(c)
                elif isinstance(c, str):
                    strings.add(c)
            for name in code.co_names:
                target = obj.__globals__.get(name)
                if inspect.isfunction(target) or isinstance(target, type):
                    todo.append(target)
    _reached[func] = result = (frozenset(names), frozenset(strings))
    return result


def tiers_of(item: pytest.Item) -> set[str]:
    fixtures = set(getattr(item, "fixturenames", ()))
    params: set[str] = set()
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        params = {v for v in callspec.params.values() if isinstance(v, str)}
    funcs = [item.function] if isinstance(item, pytest.Function) else []
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        funcs += [d.func for d in defs if d.argname != "unit_stays_in_process"]
    names: set[str] = set()
    strings: set[str] = set()
    for func in funcs:
        n, s = _reach(func)
        names |= n
        strings |= s
    tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
    if Path(str(item.fspath)).resolve().is_relative_to(TESTS / "reliability"):
        tiers.add("reliability")
    if fixtures & BROWSER_FIXTURES or params & BROWSER_FIXTURES:
        tiers.add("browser")
    if fixtures & POSTGRES_FIXTURES or "postgresql" in params or names & POSTGRES_NAMES:
        tiers.add("postgres")
    if names & PEER_NAMES or strings & PEER_PROGRAMS:
        tiers.add("peers")
    started = (fixtures & PROCESS_FIXTURES or names & PROCESS_NAMES
               or tiers & {"peers", "browser", "postgres"})
    if "unit" not in tiers:
        tiers.add("integration" if started else "unit")
    return tiers


_tiers_by_test: dict[str, set[str]] = {}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        tiers = tiers_of(item)
        for tier in sorted(tiers - {m.name for m in item.iter_markers()}):
            item.add_marker(tier)
        _tiers_by_test[item.nodeid] = tiers


@pytest.fixture(autouse=True)
def unit_stays_in_process(request, monkeypatch):
    """A unit test that starts a pacsd, a process or a socket is misclassified: it fails."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    import socket

    def refuse(what):
        def refused(*args, **kwargs):
            raise AssertionError(f"a unit test must not {what}: mark it integration")
        return refused
    monkeypatch.setattr(Server, "start", refuse("start a pacsd"))
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("start a process"))
    monkeypatch.setattr(socket.socket, "connect", refuse("open a connection"))
    monkeypatch.setattr(socket.socket, "listen", refuse("listen on a socket"))
    yield


@pytest.fixture(autouse=True)
def pydicom_validation_as_it_was():
    """pydicom's validation modes back to what they were after every test. dicomweb-client sets
    them to RAISE around its file reads and leaves them so when a read fails; the next test in
    this process then failed on a value pydicom only warns about (a long LT)."""
    from pydicom import config as pydicom_config
    settings = pydicom_config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode)
    yield
    settings.reading_validation_mode, settings.writing_validation_mode = saved


_tier_times: dict[str, list[float]] = {}


def pytest_runtest_logreport(report) -> None:
    """Setup + call + teardown of each test, added to each of its tiers."""
    tiers = _tiers_by_test.get(report.nodeid) or {"untiered"}
    for tier in tiers:
        count, seconds = _tier_times.setdefault(tier, [0, 0.0])
        _tier_times[tier] = [count + (report.when == "setup"), seconds + report.duration]


def pytest_terminal_summary(terminalreporter) -> None:
    if not _tier_times:
        return
    tr = terminalreporter
    tr.write_sep("-", "time per tier (a test in several tiers counts in each)")
    tr.write_line(f"{'tier':<12} {'tests':>6} {'seconds':>9}")
    for tier in (*TIERS, "untiered"):
        if tier in _tier_times:
            count, seconds = _tier_times[tier]
            tr.write_line(f"{tier:<12} {count:>6} {seconds:>9.1f}")
