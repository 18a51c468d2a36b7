"""One typed, frozen Config: defaults -> TOML file -> PACSD_* environment -> command line.

Every setting is declared once in SETTINGS (section, key, type, default, help); the TOML reader,
the environment reader, `pacsd config --check` and the README table all come from that list.
A bad value raises ConfigError with one line that names the setting and where it came from.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pacsd.index import backends
from pacsd.errors import ConfigError

CONFIG_FILE_NAME = "pacsd.toml"
DEFAULT_DATA = "~/pacsd-data"


# --- validators -------------------------------------------------------------------------------

def valid_aet(value: str) -> str:
    """PS3.5 6.2 (AE VR): 1-16 characters of the default repertoire, no backslash or control
    characters, not only spaces."""
    v = value.strip()
    if not v or len(v) > 16 or "\\" in v or any(ord(c) < 0x20 or ord(c) > 0x7E for c in v):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII, no backslash)")
    return v


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a TCP port (0-65535; 0 picks a free one)")
    return value


def _bind(value: str) -> str:
    if value in ("", "localhost"):
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (0.0.0.0: all interfaces)") from None
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"{value} must be greater than zero")
    return value


def _not_negative(value: float) -> float:
    if value < 0:
        raise ValueError(f"{value} must not be negative")
    return value


def _range(lo: int, hi: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return value
    return check


def _aet_list(value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(valid_aet(v) for v in value)


def _index_url(value: str) -> str:
    if value:
        backends.kind(value)   # ValueError: what a good URL looks like
    return value


def _host_list(value: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for v in value:
        name = v.strip().lower().rstrip(".") if v.strip() != "." else ""
        if name != "*" and not re.fullmatch(r"\.?[a-z0-9_\-.]+|\[?[0-9a-f:.]+\]?", name):
            raise ValueError(f"{v!r} is not a host name, an address, '.domain' or '*'")
        out.append(name.strip("[]"))
    return tuple(out)


def _network_list(value: tuple[str, ...]) -> tuple[str, ...]:
    for v in value:
        try:
            ipaddress.ip_network(v.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address or network (10.0.0.0/8)") from None
    return tuple(v.strip() for v in value)


def _one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


def _log_level(value: str) -> str:
    v = value.upper()
    if v not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"{value!r} is not one of DEBUG, INFO, WARNING, ERROR")
    return v


# --- the settings, declared once --------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    type: type
    default: Any
    help: str
    validate: Callable[[Any], Any] | None = None
    cli: str | None = None   # the `pacsd serve` flag that overrides it, if any

    @property
    def env(self) -> str:
        return f"PACSD_{self.section}_{self.key}".upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("server", "data", str, DEFAULT_DATA,
            "The server's own folder: pidfile, logs, lock, the SQLite index by default, and the "
            "images unless [storage] path is set.", None, "--data"),
    Setting("server", "housekeeping_interval", float, 3600.0,
            "Seconds between two rounds of housekeeping (temporary files left by a node that "
            "died). Of the nodes sharing an index, one at a time does it.", _positive),
    Setting("dicom", "aet", str, "PACSD", "This server's AE title.", valid_aet, "--aet"),
    Setting("dicom", "port", int, 11112, "DICOM listening port (0: any free port).", _port,
            "--dicom-port"),
    Setting("dicom", "bind", str, "0.0.0.0",
            "Address the DICOM listener binds to. All interfaces by default, since modalities "
            "must reach it; use 127.0.0.1 for a local-only server.", _bind, "--bind"),
    Setting("dicom", "max_associations", int, 64, "Associations served at once.", _range(1, 1000)),
    Setting("dicom", "allowed_calling_aets", tuple, (),
            "Calling AE titles allowed to associate; empty allows any.", _aet_list),
    Setting("dicom", "check_peer_address", bool, False,
            "A calling AE title that is a known node ([[nodes]] or the admin page) must come "
            "from that node's host (names resolved, cached a minute), else the association "
            "is rejected. Calling AE titles that are not nodes are left to "
            "`allowed_calling_aets`."),
    Setting("dicom", "acse_timeout", float, 30.0,
            "Seconds to wait for association negotiation messages.", _positive),
    Setting("dicom", "dimse_timeout", float, 120.0,
            "Seconds to wait for a DIMSE message (e.g. a C-STORE response during C-MOVE).",
            _positive),
    Setting("dicom", "network_timeout", float, 120.0,
            "Seconds of silence after which an association is dropped.", _positive),
    Setting("dicom", "max_pdu", int, 262144, "Largest PDU we accept, in bytes (0: no limit).",
            _range(0, 2**32 - 1)),
    Setting("dicom", "tls_cert", str, "",
            "TLS certificate (PEM) file: set it and `tls_key` and the DICOM listener speaks "
            "only TLS (PS3.15 B.9); plain TCP clients are refused."),
    Setting("dicom", "tls_key", str, "", "TLS private key (PEM) file of `tls_cert`."),
    Setting("dicom", "tls_ca", str, "",
            "CA certificate(s) (PEM) file: when set, DICOM TLS clients must present a "
            "certificate signed by it. Empty: no client certificate asked."),
    Setting("dicom", "max_inflated_mb", int, 1024,
            "Largest size, in MB, a Deflated Explicit VR Little Endian data set (PS3.5 A.5) may "
            "inflate to, over C-STORE, STOW-RS or import; beyond it the object is refused "
            "(0xC422). A deflated image may besides inflate to no more than its header and its "
            "declared pixel data (+ 64 MB). Counted as it streams, nothing kept (the object is "
            "stored deflated, as received); later reads are held to the same.",
            _range(1, 2**20)),
    Setting("dicom", "max_frame_pixels", int, 1 << 26,
            "Largest Rows x Columns of one frame accepted (C-STORE, STOW-RS, import) and "
            "decoded (rendered, thumbnails, frames, transcoding): a frame declaring more is "
            "refused (0xC422 / HTTP 422). 67108864 = 8192 x 8192; real modalities stay well "
            "below (mammography 4096 x 5120; whole-slide images are tiled).",
            _range(1, 65535 * 65535)),
    Setting("dicom", "max_pixel_mb", int, 4096,
            "Largest decoded size, in MB, of an object's pixel data (Rows x Columns x Frames x "
            "Samples x BitsAllocated / 8) accepted and decoded: beyond it the object is refused "
            "(0xC422 / HTTP 422). 4096 holds anything a native Pixel Data element can (under "
            "4 GiB), e.g. a 2000-frame ultrasound clip or a breast tomosynthesis volume.",
            _range(1, 2**40)),
    Setting("dicom", "open_query_retrieve", bool, False,
            "Let any calling AE title query and retrieve (C-FIND, C-GET, C-MOVE), as pacsd "
            "did before. Off by default: only nodes ([[nodes]], the admin page) may, each as "
            "its allow_find / allow_get / allow_move say. C-ECHO and C-STORE are open to any "
            "caller either way."),
    Setting("dicom", "max_associations_per_host", int, 16,
            "Associations one peer address may hold at once; beyond it the association is "
            "rejected (transient, local limit exceeded), so that one host cannot take all of "
            "`max_associations`. Loopback is a host like any other. 0: no cap.",
            _range(0, 1000)),
    Setting("http", "port", int, 8080, "HTTP port of the web side.", _port, "--http-port"),
    Setting("http", "bind", str, "127.0.0.1",
            "Address the HTTP listener binds to. Beyond loopback, [[users]] are required.",
            _bind),
    Setting("http", "cert", str, "", "TLS certificate (PEM) file: set it and `key` for HTTPS."),
    Setting("http", "key", str, "", "TLS private key (PEM) file."),
    Setting("http", "threads", int, 16, "HTTP worker threads.", _range(2, 512)),
    Setting("http", "timeout", float, 30.0,
            "Seconds a silent HTTP connection is kept before it is closed.", _positive),
    Setting("http", "max_body_mb", int, 1024,
            "Largest request body (e.g. a STOW-RS upload), in MiB.", _range(1, 65536)),
    Setting("http", "cors_origins", tuple, (),
            "Origins allowed to call the web side from a browser (e.g. an OHIF viewer); "
            "'*' for any (answered without credentials: no cookies, no HTTP Basic). Empty: no "
            "CORS headers. A listed origin (not '*') may also send changes (POST, PUT, "
            "DELETE), e.g. an OHIF viewer's STOW-RS."),
    Setting("http", "allowed_hosts", tuple, (),
            "Host names, besides this machine's own, under which browsers may reach the web "
            "side (the Host header; its port is not compared), e.g. the name of a reverse "
            "proxy; '.example.org' for a domain and its subdomains. Always allowed: "
            "localhost, this machine's host name and FQDN, any IP address. Any other Host is "
            "refused (421), which stops DNS rebinding. '*': any Host (the old behaviour).",
            _host_list),
    Setting("http", "trusted_proxies", tuple, (),
            "Addresses or networks (10.0.0.0/8) of reverse proxies whose X-Forwarded-For, "
            "X-Forwarded-Host and X-Forwarded-Proto are believed: the client is then the "
            "right-most X-Forwarded-For address that is not a trusted proxy. Empty: those "
            "headers are ignored and the client is the connecting address.", _network_list),
    Setting("http", "body_timeout", float, 20.0,
            "Seconds a request body may take to arrive, plus one second for each "
            "`body_min_rate` bytes received (Apache's mod_reqtimeout body=20,MinRate=500): a "
            "slower body is cut with 408 and its connection closed, so slow clients cannot hold "
            "the worker threads.", _positive),
    Setting("http", "body_min_rate", int, 500,
            "Bytes per second a request body must keep up after `body_timeout` (each such many "
            "bytes received earn one more second). 0: a fixed `body_timeout` for any body.",
            _range(0, 2**30)),
    Setting("storage", "path", str, "",
            "Where images are kept; empty means DATA/storage. May be a shared volume.", None),
    Setting("storage", "min_free_mb", int, 500,
            "Free space (MiB) kept on the storage volume: below it new images are refused "
            "(C-STORE 0xA700 Out of Resources, STOW-RS 507) until space is freed, so the "
            "index, its journal and the logs never meet a full disk. Nothing is ever deleted "
            "to make room. 0: no floor (only a really full disk refuses).", _range(0, 2**40)),
    Setting("storage", "overwrite", bool, False,
            "A second copy of a stored SOP Instance UID replaces the first. Default: keep the "
            "first; a copy with the same content answers Success, one with other content is "
            "refused (C-STORE 0x0111, see on_conflict) and kept aside in STORAGE/.conflicts, "
            "and storage commitment fails for that instance until it is deleted."),
    Setting("storage", "patient_mismatch", str, "refuse",
            "An instance whose study is filed under another patient (other Patient ID or "
            "Issuer), or whose series under another study: 'refuse' (C-STORE 0xC40A, STOW-RS "
            "409) or 'accept' (filed there as before, with warning 0xB000 and a log line).",
            _one_of("refuse", "accept")),
    Setting("storage", "on_conflict", str, "refuse",
            "A stored SOP Instance UID sent again with other content: 'refuse' (C-STORE 0x0111 "
            "Duplicate SOP Instance, STOW-RS 409) or 'success' (the old answer, for senders "
            "that stop a batch at any failure). Either way the new copy is kept aside in "
            "STORAGE/.conflicts, a WARNING names both, and storage commitment fails for it.",
            _one_of("refuse", "success")),
    Setting("index", "url", str, "",
            "Index database URL; empty means sqlite:///DATA/index.sqlite3. Several nodes share "
            "one PostgreSQL index: postgresql://USER:PASSWORD@HOST:PORT/DATABASE.", _index_url),
    Setting("index", "pool_size", int, 20,
            "PostgreSQL: connections this node keeps at most (requests wait for a free one).",
            _range(2, 1000)),
    Setting("index", "auto_migrate", bool, True,
            "Bring the index's schema up to date at start-up; false: refuse to start until "
            "`pacsd migrate` has been run (for clusters upgraded node by node)."),
    Setting("hooks", "plugins", tuple, (),
            "Python plugins to load: module names (pacsd.plugins.webhook) or .py files. Plugins "
            "installed as packages with a `pacsd.plugins` entry point load too. Settings of a "
            "plugin go in its own [plugin.NAME] table."),
    Setting("hooks", "timeout", float, 5.0,
            "Seconds a hook may take: a filter that takes longer is overruled (the image is "
            "accepted as it is) and a notification that takes longer is logged.", _positive),
    Setting("hooks", "study_stable_after", float, 60.0,
            "Seconds without a new instance after which a study is stable: the on_study_stable "
            "hooks run and the routes with when = \"stable\" send it.", _positive),
    Setting("routing", "max_attempts", int, 20,
            "Tries of a routing job before it goes to the dead-letter list (admin page, "
            "`pacsd queue`).", _range(1, 1000)),
    Setting("routing", "retry_delay", float, 30.0,
            "Seconds before the second try of a failed routing job; doubled at each further "
            "try, up to an hour.", _positive),
    Setting("routing", "concurrency", int, 2,
            "Associations this node opens at once to each routing destination.", _range(1, 64)),
    Setting("log", "level", str, "INFO", "DEBUG, INFO, WARNING or ERROR.", _log_level),
    Setting("log", "file", str, "",
            "Log file; empty means DATA/pacsd.log. '-' logs to standard error only.", None),
    # pacsd-watchdog reads these (the server ignores them).
    # Defaults chosen so that a hang is killed within 60 s (the worst case is a hang just after a
    # round passed): `failures` x `interval` + `timeout` = 3 x 10 + 5 = 35 s to the third failed
    # round; then a stopped server is killed at once (35 s), one showing no sign of stopping
    # 0.5 s (stack dump) + `react_wait` 5 s after SIGTERM (40.5 s), one stopping cleanly gets
    # up to `term_wait` 20 s (55.5 s). systemd restarts it `RestartSec` = 5 s later.
    Setting("watchdog", "interval", float, 10.0, "Seconds between two rounds of probes.",
            _positive),
    Setting("watchdog", "grace", float, 120.0,
            "Seconds after the server (re)started during which it is never killed.",
            _not_negative),
    Setting("watchdog", "failures", int, 3,
            "Consecutive failed rounds (any probe failing) before the server is killed.",
            _range(1, 100)),
    Setting("watchdog", "timeout", float, 5.0,
            "Seconds each probe (HTTP, XML-RPC, C-ECHO) may take before it counts as failed.",
            _positive),
    Setting("watchdog", "term_wait", float, 20.0,
            "Seconds between SIGTERM and SIGKILL when killing a hung server that is stopping "
            "(see `react_wait`). A stopped (SIGSTOP) server gets SIGKILL at once.", _positive),
    Setting("watchdog", "max_kills_per_hour", int, 3,
            "Kills allowed in any hour; beyond it the watchdog only alerts (no kill loop).",
            _range(0, 100)),
    Setting("watchdog", "min_free_mb", int, 200,
            "Below this much free space on the storage volume a restart cannot help: the "
            "watchdog reports instead of killing.", _range(0, 2**40)),
    Setting("watchdog", "roundtrip", bool, False,
            "Also store a tiny instance to the server and find it in the index (C-STORE + "
            "C-FIND) each round."),
    Setting("watchdog", "on_kill", str, "",
            "A command run after each kill (and each refused kill), e.g. a mail or webhook "
            "script; it gets PACSD_WATCHDOG_EVENT and PACSD_WATCHDOG_REASON."),
    Setting("watchdog", "launchd_label", str, "",
            "Under launchd: restart with `launchctl kickstart -k` on this label instead of "
            "signals."),
    Setting("watchdog", "log_file", str, "",
            "The watchdog's log; empty means DATA/watchdog.log, '-' standard error only."),
    Setting("watchdog", "react_wait", float, 5.0,
            "Seconds after SIGTERM within which a hung server must show that it is stopping "
            "(its HTTP listener closes); one that shows nothing (hung, or SIGTERM ignored) gets "
            "SIGKILL then instead of after `term_wait`.", _positive),
)

_BY_NAME = {(s.section, s.key): s for s in SETTINGS}


# --- the Config object ------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """A remote DICOM node: a C-MOVE destination or a send target."""

    name: str
    aet: str
    host: str
    port: int
    # Transfer syntax UIDs in order of preference ([[nodes]] transfer_syntaxes); empty: the
    # stored syntax when the node accepts it, else Explicit then Implicit VR Little Endian.
    transfer_syntaxes: tuple[str, ...] = ()
    # What this node may ask of us when it calls as `aet` (Orthanc's AllowFind / AllowGet /
    # AllowMove / AllowStore). Callers that are not nodes may only echo and store (and ask
    # storage commitment), unless [dicom] open_query_retrieve.
    allow_find: bool = True
    allow_get: bool = True
    allow_move: bool = True
    allow_store: bool = True


@dataclass(frozen=True)
class Route:
    """A routing rule ([[routes]]): what matches goes to `to` (a node's name or AE title),
    as soon as it is stored or once its study is stable."""

    name: str
    to: str
    when: str = "stable"                 # "stored" (each instance) or "stable" (the study)
    calling_aets: tuple[str, ...] = ()   # any of these callers; empty: any
    match: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (keyword, any of these patterns)


@dataclass(frozen=True)
class User:
    """A web / XML-RPC user; `password_hash` as made by `pacsd passwd`."""

    name: str
    password_hash: str
    admin: bool = False


@dataclass(frozen=True)
class Config:
    data: Path
    dicom_aet: str
    dicom_port: int
    dicom_bind: str
    dicom_max_associations: int
    dicom_allowed_calling_aets: tuple[str, ...]
    dicom_acse_timeout: float
    dicom_dimse_timeout: float
    dicom_network_timeout: float
    dicom_max_pdu: int
    http_port: int
    http_bind: str
    storage_path: Path
    storage_overwrite: bool
    index_url: str
    log_level: str
    log_file: str
    index_pool_size: int = 20
    index_auto_migrate: bool = True
    housekeeping_interval: float = 3600.0
    dicom_check_peer_address: bool = False
    dicom_tls_cert: str = ""
    dicom_tls_key: str = ""
    dicom_tls_ca: str = ""
    dicom_max_inflated_mb: int = 1024
    dicom_max_frame_pixels: int = 1 << 26
    dicom_max_pixel_mb: int = 4096
    dicom_open_query_retrieve: bool = False
    dicom_max_associations_per_host: int = 16
    http_cert: str = ""
    http_key: str = ""
    http_threads: int = 16
    http_timeout: float = 30.0
    http_max_body_mb: int = 1024
    http_cors_origins: tuple[str, ...] = ()
    http_allowed_hosts: tuple[str, ...] = ()
    http_trusted_proxies: tuple[str, ...] = ()
    http_body_timeout: float = 20.0
    http_body_min_rate: int = 500
    storage_min_free_mb: int = 500
    storage_patient_mismatch: str = "refuse"
    storage_on_conflict: str = "refuse"
    watchdog_interval: float = 10.0
    watchdog_grace: float = 120.0
    watchdog_failures: int = 3
    watchdog_timeout: float = 5.0
    watchdog_term_wait: float = 20.0
    watchdog_max_kills_per_hour: int = 3
    watchdog_min_free_mb: int = 200
    watchdog_roundtrip: bool = False
    watchdog_on_kill: str = ""
    watchdog_launchd_label: str = ""
    watchdog_log_file: str = ""
    watchdog_react_wait: float = 5.0
    hooks_plugins: tuple[str, ...] = ()
    hooks_timeout: float = 5.0
    hooks_study_stable_after: float = 60.0
    routing_max_attempts: int = 20
    routing_retry_delay: float = 30.0
    routing_concurrency: int = 2
    nodes: tuple[Node, ...] = ()
    users: tuple[User, ...] = ()
    routes: tuple[Route, ...] = ()
    plugin_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = "defaults"   # the config file it came from, for messages

    def node_by_aet(self, aet: str) -> Node | None:
        aet = aet.strip()
        return next((n for n in self.nodes if n.aet == aet), None)

    @property
    def pidfile(self) -> Path:
        return self.data / "pacsd.pid"

    @property
    def runfile(self) -> Path:
        """JSON written once the listeners are open: pid, AE title, bound ports."""
        return self.data / "pacsd.json"

    @property
    def index_is_sqlite(self) -> bool:
        return backends.kind(self.index_url) == backends.SQLITE

    @property
    def index_path(self) -> Path:
        """The SQLite index file (only when index_is_sqlite)."""
        return backends.sqlite_path(self.index_url)

    @property
    def index_label(self) -> str:
        """The index as logs and status show it: its file, or its URL without the password."""
        return str(self.index_path) if self.index_is_sqlite else backends.redacted(self.index_url)

    @property
    def log_path(self) -> Path | None:
        """The log file, or None when the log goes to standard error only ("-")."""
        if self.log_file == "-":
            return None
        return Path(self.log_file).expanduser() if self.log_file else self.data / "pacsd.log"

    @property
    def watchdog_log_path(self) -> Path | None:
        """The watchdog's log file, or None for standard error only ("-")."""
        if self.watchdog_log_file == "-":
            return None
        return Path(self.watchdog_log_file).expanduser() if self.watchdog_log_file \
            else self.data / "watchdog.log"


# --- loading ----------------------------------------------------------------------------------

def _coerce(s: Setting, value: Any, origin: str) -> Any:
    try:
        if s.type is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(f"{value!r} is not a boolean")
                value = low in ("1", "true", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError(f"{value!r} is not a boolean")
        elif s.type is int:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(f"{value!r} is not an integer")
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an integer") from None
        elif s.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"{value!r} is not a number")
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a number") from None
        elif s.type is tuple:
            if isinstance(value, str):
                value = [v for v in re.split(r"[,\s]+", value) if v]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{value!r} is not a list of strings")
            value = tuple(value)
        elif not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        return s.validate(value) if s.validate else value
    except ValueError as e:
        raise ConfigError(f"[{s.section}] {s.key} from {origin}: {e}") from None


def node_from(item: dict[str, Any]) -> Node:
    """A Node from a table (TOML [[nodes]], the admin page): KeyError or ValueError if bad."""
    aet = valid_aet(str(item["aet"]))
    host = str(item["host"]).strip()
    port = item["port"]
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"host {host!r} is not a host name or address")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r} is not 1-65535")
    name = str(item.get("name") or aet).strip()
    if not name or len(name) > 64:
        raise ValueError("name must be 1-64 characters")
    syntaxes = _transfer_syntaxes(name, item.get("transfer_syntaxes") or [])
    rights = {}
    for key in NODE_RIGHTS:
        value = item.get(key, True)
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, not {value!r}")
        rights[key] = value
    return Node(name=name, aet=aet, host=host, port=port, transfer_syntaxes=syntaxes, **rights)


NODE_RIGHTS = ("allow_find", "allow_get", "allow_move", "allow_store")


def _transfer_syntaxes(node: str, raw: Any) -> tuple[str, ...]:
    """[[nodes]] transfer_syntaxes: UIDs or pydicom names ("ExplicitVRLittleEndian") of known
    transfer syntaxes, in order of preference; ValueError naming the node otherwise."""
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise ValueError(f"node {node!r}: transfer_syntaxes must be a list of strings")
    if not raw:
        return ()
    from pydicom import uid  # only when used: pydicom is slow to import for `pacsd --help`
    out: list[str] = []
    for value in raw:
        found = getattr(uid, value.strip(), None) if value.strip().isidentifier() else None
        ts = found if isinstance(found, uid.UID) else uid.UID(value.strip())
        if not (ts in uid.UID_dictionary and ts.is_transfer_syntax):
            raise ValueError(f"node {node!r}: transfer_syntaxes: {value!r} is not a transfer "
                             "syntax UID or name pydicom knows")
        if str(ts) not in out:
            out.append(str(ts))
    return tuple(out)


def _tables(raw: Any, origin: str, kind: str, keys: set[str]
            ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each table of an array of tables ([[nodes]], [[users]]), with where it is for messages,
    once it is known to be a table holding only `keys`."""
    if not isinstance(raw, list):
        raise ConfigError(f"[[{kind}]] in {origin} must be an array of tables")
    for i, item in enumerate(raw, 1):
        where = f"[[{kind}]] #{i} in {origin}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: not a table")
        unknown = set(item) - keys
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        yield where, item


def _nodes(raw: Any, origin: str) -> tuple[Node, ...]:
    nodes: list[Node] = []
    for where, item in _tables(raw, origin, "nodes",
                               {"name", "aet", "host", "port", "transfer_syntaxes", *NODE_RIGHTS}):
        try:
            node = node_from(item)
        except KeyError as e:
            raise ConfigError(f"{where}: missing {e.args[0]!r}") from None
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if any(n.name == node.name or n.aet == node.aet for n in nodes):
            raise ConfigError(f"{where}: name {node.name!r} or AE title {node.aet!r} appears "
                              "twice")
        nodes.append(node)
    return tuple(nodes)


def _routes(raw: Any, origin: str) -> tuple[Route, ...]:
    from pydicom.datadict import keyword_for_tag, tag_for_keyword
    routes: list[Route] = []
    for where, item in _tables(raw, origin, "routes",
                               {"name", "to", "when", "calling_aet", "match"}):
        name, to = str(item.get("name", "")).strip(), str(item.get("to", "")).strip()
        if not name or not to:
            raise ConfigError(f"{where}: name and to (a node's name or AE title) are required")
        if any(r.name == name for r in routes):
            raise ConfigError(f"{where}: route {name!r} appears twice")
        when = str(item.get("when", "stable"))
        if when not in ("stored", "stable"):
            raise ConfigError(f"{where}: when must be \"stored\" or \"stable\", not {when!r}")
        callers = item.get("calling_aet", [])
        callers = [callers] if isinstance(callers, str) else callers
        if not isinstance(callers, list) or not all(isinstance(c, str) for c in callers):
            raise ConfigError(f"{where}: calling_aet must be an AE title or a list of them")
        match = item.get("match", {})
        if not isinstance(match, dict):
            raise ConfigError(f"{where}: match must be a table: {{ Modality = \"CT\" }}")
        keys = []
        for key, patterns in match.items():
            # A keyword (StudyDescription) or a tag (00081030, 0008,1030); any attribute.
            tag = re.sub(r"[^0-9A-Fa-f]", "", key) if re.fullmatch(
                r"\(?[0-9A-Fa-f]{4},?[0-9A-Fa-f]{4}\)?", key) else None
            if tag is None and tag_for_keyword(key) is None:
                raise ConfigError(f"{where}: {key!r} is neither a DICOM keyword nor a tag")
            keyword = (keyword_for_tag(int(tag, 16)) or tag) if tag else key
            values = [patterns] if isinstance(patterns, (str, int)) else patterns
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: match {key!r} must be a value or a list of values")
            keys.append((keyword, tuple(str(v) for v in values)))
        try:
            calling_aets = tuple(valid_aet(c) for c in callers)
        except ValueError as e:
            raise ConfigError(f"{where}: calling_aet {e}") from None
        routes.append(Route(name=name, to=to, when=when, calling_aets=calling_aets,
                            match=tuple(keys)))
    return tuple(routes)


def _users(raw: Any, origin: str) -> tuple[User, ...]:
    users: list[User] = []
    for where, item in _tables(raw, origin, "users", {"name", "password_hash", "admin"}):
        name, hashed = item.get("name"), item.get("password_hash")
        if not isinstance(name, str) or not name.strip() or ":" in name:
            raise ConfigError(f"{where}: name must be a non-empty string without ':'")
        if not isinstance(hashed, str) or not hashed.startswith("pbkdf2_sha256$"):
            raise ConfigError(f"{where}: password_hash must come from `pacsd passwd`")
        if any(u.name == name for u in users):
            raise ConfigError(f"{where}: user {name!r} appears twice")
        users.append(User(name=name, password_hash=hashed, admin=bool(item.get("admin"))))
    return tuple(users)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None


def load(path: Path | str | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the Config. `overrides` maps "section.key" to values from the command line.

    The file is `path`, else $PACSD_CONFIG, else DATA/pacsd.toml when it exists.
    """
    env = os.environ if env is None else env
    overrides = dict(overrides or {})
    values: dict[tuple[str, str], Any] = {(s.section, s.key): s.default for s in SETTINGS}
    origins: dict[tuple[str, str], str] = {}

    def data_hint() -> str:
        return str(overrides.get("server.data") or env.get("PACSD_SERVER_DATA")
                   or env.get("PACSD_DATA") or DEFAULT_DATA)

    file = path or env.get("PACSD_CONFIG")
    if not file:
        candidate = Path(data_hint()).expanduser() / CONFIG_FILE_NAME
        file = candidate if candidate.is_file() else None
    raw: dict[str, Any] = read_toml(Path(file)) if file else {}
    source = str(file) if file else "defaults"

    nodes: tuple[Node, ...] = ()
    users: tuple[User, ...] = ()
    routes: tuple[Route, ...] = ()
    plugins: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section == "nodes":
            nodes = _nodes(table, source)
            continue
        if section == "users":
            users = _users(table, source)
            continue
        if section == "routes":
            routes = _routes(table, source)
            continue
        if section == "plugin":   # [plugin.NAME]: each plugin's own settings, as written
            if not isinstance(table, dict) or not all(isinstance(v, dict)
                                                      for v in table.values()):
                raise ConfigError(f"{source}: [plugin.NAME] tables only, one per plugin")
            plugins = {name: dict(v) for name, v in table.items()}
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {section!r} must be a [section]")
        for key, value in table.items():
            s = _BY_NAME.get((section, key))
            if s is None:
                raise ConfigError(f"{source}: unknown setting [{section}] {key}")
            values[(section, key)] = _coerce(s, value, source)
            origins[(section, key)] = source

    for s in SETTINGS:
        names = [s.env] + (["PACSD_DATA"] if s.env == "PACSD_SERVER_DATA" else [])
        for name in names:
            if name in env:
                values[(s.section, s.key)] = _coerce(s, env[name], f"${name}")
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        s = _BY_NAME[(section, key)]
        values[(section, key)] = _coerce(s, value, f"the command line ({s.cli or dotted})")

    data = Path(values[("server", "data")]).expanduser().absolute()
    storage = values[("storage", "path")]
    index_url = values[("index", "url")] or f"sqlite:///{data / 'index.sqlite3'}"
    flat = {f"{sec}_{key}": v for (sec, key), v in values.items() if sec != "server"}
    flat["storage_path"] = Path(storage).expanduser().absolute() if storage else data / "storage"
    flat["index_url"] = index_url
    flat["housekeeping_interval"] = values[("server", "housekeeping_interval")]
    if (flat["http_cert"] == "") != (flat["http_key"] == ""):
        raise ConfigError("[http] cert and key: set both for HTTPS, or neither")
    if (flat["dicom_tls_cert"] == "") != (flat["dicom_tls_key"] == ""):
        raise ConfigError("[dicom] tls_cert and tls_key: set both for DICOM TLS, or neither")
    if flat["dicom_tls_ca"] and not flat["dicom_tls_cert"]:
        raise ConfigError("[dicom] tls_ca needs tls_cert and tls_key (client certificates are "
                          "only asked for over TLS)")
    if not users and flat["http_bind"] not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError(f"[http] bind = {flat['http_bind']!r} reaches beyond this machine: "
                          "add [[users]] (see `pacsd passwd`) or bind to 127.0.0.1")
    return Config(data=data, nodes=nodes, users=users, routes=routes, plugin_settings=plugins,
                  source=source, **flat)


def describe() -> str:
    """The settings as a Markdown table (used by `pacsd config --list` and the README)."""
    rows = ["| setting | env | flag | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = list(s.default) if isinstance(s.default, tuple) else s.default
        flag = f"`{s.cli}`" if s.cli else ""
        rows.append(f"| `[{s.section}] {s.key}` | `{s.env}` | {flag} | `{default!r}` | {s.help} |")
    return "\n".join(rows)
