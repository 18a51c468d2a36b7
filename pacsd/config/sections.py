"""Every setting, declared once: one frozen dataclass per TOML section, one field per setting.

A field's default is the setting's default, its annotation the type, and its metadata (made by
`setting()`) the help text, the validator, and the `pacsd serve` flag if any; the environment
variable is PACSD_<SECTION>_<KEY>. The loader, the flat view (`cfg.dicom_port`), the serve flags
`pacsd config --list` and the settings reference are all derived from these classes
(`SETTINGS`), in the manner of gunicorn's `config.Setting`.

A new setting: add a field to its section here (and read it as `cfg.SECTION.KEY`, or the flat
`cfg.SECTION_KEY`); nothing else to declare. A new section: a new class, listed in SECTIONS.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

from pacsd.config import validators as v

DEFAULT_DATA = "~/pacsd-data"
_META = "pacsd.setting"


@dataclass(frozen=True)
class Setting:
    """One setting as the loader, the command line and the reference see it (derived)."""

    section: str
    key: str
    type: type
    default: Any
    help: str
    validate: Callable[[Any], Any] | None = None
    cli: str | None = None   # the `pacsd serve` flag that overrides it, if any
    metavar: str | None = None
    env_aliases: tuple[str, ...] = ()   # older environment names still read

    @property
    def env(self) -> str:
        return f"PACSD_{self.section}_{self.key}".upper()

    @property
    def dotted(self) -> str:
        """"section.key", as `load(overrides=...)` takes it."""
        return f"{self.section}.{self.key}"


def setting(default: Any, help: str, validate: Callable[[Any], Any] | None = None, *,
            flag: str | None = None, metavar: str | None = None,
            env_aliases: tuple[str, ...] = ()) -> Any:
    """A section field: its default, plus what the loader, the flags and the reference need."""
    return dataclasses.field(default=default, metadata={_META: dict(
        help=help, validate=validate, cli=flag, metavar=metavar, env_aliases=env_aliases)})


@dataclass(frozen=True)
class ServerSettings:
    """[server]: the data folder and what the server does on its own."""

    data: str = setting(DEFAULT_DATA,
        "The server's own folder: pidfile, logs, lock, the SQLite index by default, and the "
        "images unless [storage] path is set.", flag="--data", metavar="DIR",
        env_aliases=("PACSD_DATA",))
    housekeeping_interval: float = setting(3600.0,
        "Seconds between two rounds of housekeeping (temporary files left by a node that "
        "died). Of the nodes sharing an index, one at a time does it.", v.positive)


@dataclass(frozen=True)
class DicomSettings:
    """[dicom]: the DICOM listener, its limits, and who may do what."""

    aet: str = setting("PACSD",
        "This server's AE title.", v.valid_aet, flag="--aet")
    port: int = setting(11112,
        "DICOM listening port (0: any free port).", v.port, flag="--dicom-port", metavar="N")
    bind: str = setting("0.0.0.0",
        "Address the DICOM listener binds to. All interfaces by default, since modalities "
        "must reach it; use 127.0.0.1 for a local-only server.",
        v.bind, flag="--bind", metavar="ADDR")
    max_associations: int = setting(64,
        "Associations served at once.", v.in_range(1, 1000))
    allowed_calling_aets: tuple[str, ...] = setting((),
        "Calling AE titles allowed to associate; empty allows any.", v.aet_list)
    check_peer_address: bool = setting(False,
        "A calling AE title that is a known node ([[nodes]] or the admin page) must come "
        "from that node's host (names resolved, cached a minute), else the association "
        "is rejected. Calling AE titles that are not nodes are left to "
        "`allowed_calling_aets`.")
    acse_timeout: float = setting(30.0,
        "Seconds to wait for association negotiation messages.", v.positive)
    dimse_timeout: float = setting(120.0,
        "Seconds to wait for a DIMSE message (e.g. a C-STORE response during C-MOVE).",
        v.positive)
    network_timeout: float = setting(120.0,
        "Seconds of silence after which an association is dropped.", v.positive)
    fast_lane: bool = setting(True,
        "On associations we accept: C-STORE and C-ECHO answered by the thread that reads the "
        "association, the data set written to its file as it arrives, and the files of a "
        "C-GET sent raw by pacsd (pacsd.compat.pynetdicom_lane); false: every message through "
        "pynetdicom's DIMSE layer, as before. For comparison and as a way back.")
    workers: int = setting(0,
        "DICOM worker processes behind the one DICOM port, each serving its own "
        "associations on its own core (pacsd.daemon.workers); the server's process "
        "supervises them and restarts one that dies. 0: one per core; 1: no workers, the "
        "DICOM side runs in the server's own process.", v.in_range(0, 64))
    max_pdu: int = setting(262144,
        "Largest PDU we accept, in bytes (0: no limit).", v.in_range(0, 2**32 - 1))
    tls_cert: str = setting("",
        "TLS certificate (PEM) file: set it and `tls_key` and the DICOM listener speaks "
        "only TLS (PS3.15 B.9); plain TCP clients are refused.")
    tls_key: str = setting("",
        "TLS private key (PEM) file of `tls_cert`.")
    tls_ca: str = setting("",
        "CA certificate(s) (PEM) file: when set, DICOM TLS clients must present a "
        "certificate signed by it. Empty: no client certificate asked.")
    max_inflated_mb: int = setting(1024,
        "Largest size, in MB, a Deflated Explicit VR Little Endian data set (PS3.5 A.5) may "
        "inflate to, over C-STORE, STOW-RS or import; beyond it the object is refused "
        "(0xC422). A deflated image may besides inflate to no more than its header and its "
        "declared pixel data (+ 64 MB). Counted as it streams, nothing kept (the object is "
        "stored deflated, as received); later reads are held to the same.", v.in_range(1, 2**20))
    max_frame_pixels: int = setting(1 << 26,
        "Largest Rows x Columns of one frame accepted (C-STORE, STOW-RS, import) and "
        "decoded (rendered, thumbnails, frames, transcoding): a frame declaring more is "
        "refused (0xC422 / HTTP 422). 67108864 = 8192 x 8192; real modalities stay well "
        "below (mammography 4096 x 5120; whole-slide images are tiled).",
        v.in_range(1, 65535 * 65535))
    max_pixel_mb: int = setting(4096,
        "Largest decoded size, in MB, of an object's pixel data (Rows x Columns x Frames x "
        "Samples x BitsAllocated / 8) accepted and decoded: beyond it the object is refused "
        "(0xC422 / HTTP 422). 4096 holds anything a native Pixel Data element can (under "
        "4 GiB), e.g. a 2000-frame ultrasound clip or a breast tomosynthesis volume.",
        v.in_range(1, 2**40))
    open_query_retrieve: bool = setting(False,
        "Let any calling AE title query and retrieve (C-FIND, C-GET, C-MOVE), as pacsd "
        "did before. Off by default: only nodes ([[nodes]], the admin page) may, each as "
        "its allow_find / allow_get / allow_move say. C-ECHO and C-STORE are open to any "
        "caller either way.")
    accept_unknown_sop_classes: bool = setting(True,
        "Accept storage SOP classes pynetdicom does not know (private ones such as Siemens "
        "CSA Non-Image 1.3.12.2.1107.5.9.1 or GE's 1.2.840.113619.4.*, and newer standard "
        "ones) and store them as received. False: refuse them at association (each refused "
        "presentation context is logged).")
    max_associations_per_host: int = setting(16,
        "Associations one peer address may hold at once; beyond it the association is "
        "rejected (transient, local limit exceeded), so that one host cannot take all of "
        "`max_associations`. Loopback is a host like any other. 0: no cap.", v.in_range(0, 1000))
    on_demand_budget: float = setting(3.0,
        "Seconds a search (C-FIND, QIDO-RS, the study list) waits at most for the upstream "
        "nodes ([[nodes]] with on_demand = true, docs/on-demand.md) before it answers with "
        "what it has: an upstream slower than this, or down, is left out of that answer and "
        "its association aborted.", v.positive)


@dataclass(frozen=True)
class HttpSettings:
    """[http]: the web side's listener (WADO, DICOMweb, XML-RPC, the pages)."""

    port: int = setting(8080,
        "HTTP port of the web side.", v.port, flag="--http-port", metavar="N")
    bind: str = setting("127.0.0.1",
        "Address the HTTP listener binds to (0.0.0.0: every interface). Beyond loopback an "
        "administrator is required, in [[users]] or added on the admin page.",
        v.bind, flag="--http-bind", metavar="ADDR")
    cert: str = setting("",
        "TLS certificate (PEM) file: set it and `key` for HTTPS.")
    key: str = setting("",
        "TLS private key (PEM) file.")
    threads: int = setting(16,
        "HTTP worker threads.", v.in_range(2, 512))
    timeout: float = setting(30.0,
        "Seconds a silent HTTP connection is kept before it is closed.", v.positive)
    max_body_mb: int = setting(1024,
        "Largest request body (e.g. a STOW-RS upload), in MiB.", v.in_range(1, 65536))
    cors_origins: tuple[str, ...] = setting((),
        "Origins allowed to call the web side from a browser (e.g. an OHIF viewer); "
        "'*' for any (answered without credentials: no cookies, no HTTP Basic). Empty: no "
        "CORS headers. A listed origin (not '*') may also send changes (POST, PUT, "
        "DELETE), e.g. an OHIF viewer's STOW-RS.")
    allowed_hosts: tuple[str, ...] = setting((),
        "Host names, besides this machine's own, under which browsers may reach the web "
        "side (the Host header; its port is not compared), e.g. the name of a reverse "
        "proxy; '.example.org' for a domain and its subdomains. Always allowed: "
        "localhost, this machine's host name and FQDN, any IP address. Any other Host is "
        "refused (421), which stops DNS rebinding. '*': any Host (the old behaviour).", v.host_list)
    trusted_proxies: tuple[str, ...] = setting((),
        "Addresses or networks (10.0.0.0/8) of reverse proxies whose X-Forwarded-For, "
        "X-Forwarded-Host and X-Forwarded-Proto are believed: the client is then the "
        "right-most X-Forwarded-For address that is not a trusted proxy. Empty: those "
        "headers are ignored and the client is the connecting address.", v.network_list)
    body_timeout: float = setting(20.0,
        "Seconds a request body may take to arrive, plus one second for each "
        "`body_min_rate` bytes received (Apache's mod_reqtimeout body=20,MinRate=500): a "
        "slower body is cut with 408 and its connection closed, so slow clients cannot hold "
        "the worker threads.", v.positive)
    osirix_port: int = setting(0,
        "A second HTTP port serving the same web side (XML-RPC, /testdbalive, WADO...), for "
        "scripts and monitors written for OsiriX's web portal port (3333 in OsiriX/Horos). "
        "0: off.", v.port)
    download_max_mb: int = setting(1024,
        "Largest file, in MiB, that XML-RPC DownloadURL fetches from a node.",
        v.in_range(1, 65536))
    body_min_rate: int = setting(500,
        "Bytes per second a request body must keep up after `body_timeout` (each such many "
        "bytes received earn one more second). 0: a fixed `body_timeout` for any body.",
        v.in_range(0, 2**30))
    ohif_url: str = setting("",
        "Where an OHIF viewer is served (https://ohif.example.org): the study list and the "
        "viewer then link each study to {ohif_url}/viewer?StudyInstanceUIDs=UID. OHIF reads "
        "it from pacsd's /dicom-web (its data source, and its origin in `cors_origins`). "
        "Empty: no OHIF link.", v.web_url)


@dataclass(frozen=True)
class StorageSettings:
    """[storage]: where images are kept, and what a second copy does."""

    path: str = setting("",
        "Where images are kept; empty means DATA/storage. May be a shared volume.")
    min_free_mb: int = setting(500,
        "Free space (MiB) kept on the storage volume: below it new images are refused "
        "(C-STORE 0xA700 Out of Resources, STOW-RS 507) until space is freed, so the "
        "index, its journal and the logs never meet a full disk. Only the recycle bin is "
        "emptied to make room (oldest deletion first, once free space comes within 1 GiB of "
        "this floor); no stored image is ever deleted. 0: no floor (only a really full disk "
        "refuses).", v.in_range(0, 2**40))
    trash_days: int = setting(30,
        "Days a deleted study, series or instance stays in the recycle bin (STORAGE/.trash), "
        "invisible to queries and retrieves and restorable byte for byte with `pacsd trash "
        "restore UID`; then it is removed for good (by housekeeping, a log line each).",
        v.in_range(1, 36500))
    rejection_notes: str = setting("ignore",
        "IHE IOCM rejection notes (a Key Object Selection titled Rejected for Quality "
        "Reasons, for Patient Safety Reasons, Incorrect Modality Worklist Entry or Data "
        "Retention Policy Expired) sent by a modality or workstation: 'ignore' (stored as "
        "any object) or 'bin' (also moves the instances it names to the recycle bin, "
        "restorable).", v.one_of("ignore", "bin"))
    scrub_days: float = setting(30.0,
        "Every stored file is read back and compared with the content hash kept when it was "
        "stored, once soon after it is stored and then once every this many days (a "
        "background pass paced to take that long); a missing or changed file is logged at "
        "ERROR, shown on /status and never sent. 0: no background checks (`pacsd verify` "
        "still checks on demand).", v.in_range(0, 3650))
    scrub_mb_per_s: float = setting(20.0,
        "The most the background checks read per second (MiB), whatever scrub_days asks: "
        "the disk stays the modalities' and the viewers'.", v.in_range(1, 10000))
    overwrite: bool = setting(False,
        "A second copy of a stored SOP Instance UID replaces the first. Default: keep the "
        "first; a copy with the same content answers Success, one with other content is "
        "refused (C-STORE 0x0111, see on_conflict) and kept aside in STORAGE/.conflicts, "
        "and storage commitment fails for that instance until it is deleted.")
    patient_mismatch: str = setting("refuse",
        "An instance whose study is filed under another patient (other Patient ID or "
        "Issuer), or whose series under another study: 'refuse' (C-STORE 0xC40A, STOW-RS "
        "409) or 'accept' (filed there as before, with warning 0xB000 and a log line).",
        v.one_of("refuse", "accept"))
    on_conflict: str = setting("refuse",
        "A stored SOP Instance UID sent again with other content: 'refuse' (C-STORE 0x0111 "
        "Duplicate SOP Instance, STOW-RS 409) or 'success' (the old answer, for senders "
        "that stop a batch at any failure). Either way the new copy is kept aside in "
        "STORAGE/.conflicts, a WARNING names both, and storage commitment fails for it.",
        v.one_of("refuse", "success"))
    warm_metadata: bool = setting(True,
        "Build each instance's DICOMweb metadata into STORAGE/.cache/metadata when its study "
        "turns stable ([hooks] study_stable_after), so that the first WADO-RS metadata "
        "request is as fast as the next; off: built on first use. A few KB an instance; "
        "the folder can be deleted at any time.")


@dataclass(frozen=True)
class IndexSettings:
    """[index]: the index database (SQLite, or a shared PostgreSQL)."""

    url: str = setting("",
        "Index database URL; empty means sqlite:///DATA/index.sqlite3. Several nodes share "
        "one PostgreSQL index: postgresql://USER:PASSWORD@HOST:PORT/DATABASE.", v.index_url)
    pool_size: int = setting(20,
        "PostgreSQL: connections this node keeps at most (requests wait for a free one).",
        v.in_range(2, 1000))
    auto_migrate: bool = setting(True,
        "Bring the index's schema up to date at start-up; false: refuse to start until "
        "`pacsd migrate` has been run (for clusters upgraded node by node).")


@dataclass(frozen=True)
class HooksSettings:
    """[hooks]: plugins and how long their hooks may take."""

    plugins: tuple[str, ...] = setting((),
        "Python plugins to load: module names (pacsd.plugins.webhook) or .py files. Plugins "
        "installed as packages with a `pacsd.plugins` entry point load too. Settings of a "
        "plugin go in its own [plugin.NAME] table.")
    timeout: float = setting(5.0,
        "Seconds a hook may take: a filter that takes longer is overruled (the image is "
        "accepted as it is) and a notification that takes longer is logged.", v.positive)
    study_stable_after: float = setting(60.0,
        "Seconds without a new instance after which a study is stable: the on_study_stable "
        "hooks run and the routes with when = \"stable\" send it.", v.positive)


@dataclass(frozen=True)
class RoutingSettings:
    """[routing]: how routing jobs ([[routes]]) are sent and retried."""

    max_attempts: int = setting(20,
        "Tries of a routing job before it goes to the dead-letter list (admin page, "
        "`pacsd queue`).", v.in_range(1, 1000))
    retry_delay: float = setting(30.0,
        "Seconds before the second try of a failed routing job; doubled at each further "
        "try, up to an hour.", v.positive)
    concurrency: int = setting(2,
        "Associations this node opens at once to each routing destination.", v.in_range(1, 64))


@dataclass(frozen=True)
class LogSettings:
    """[log]: the server's log."""

    level: str = setting("INFO",
        "DEBUG, INFO, WARNING or ERROR.", v.log_level)
    file: str = setting("",
        "Log file; empty means DATA/pacsd.log. '-' logs to standard error only.")


@dataclass(frozen=True)
class WatchdogSettings:
    """[watchdog]: read by pacsd-watchdog (the server ignores them)."""

    # Defaults chosen so that a hang is killed within 60 s (the worst case is a hang just after a
    # round passed): `failures` x `interval` + `timeout` = 3 x 10 + 5 = 35 s to the third failed
    # round; then a stopped server is killed at once (35 s), one showing no sign of stopping
    # 0.5 s (stack dump) + `react_wait` 5 s after SIGTERM (40.5 s), one stopping cleanly gets
    # up to `term_wait` 20 s (55.5 s). systemd restarts it `RestartSec` = 5 s later.
    interval: float = setting(10.0,
        "Seconds between two rounds of probes.", v.positive)
    grace: float = setting(120.0,
        "Seconds after the server (re)started during which it is never killed.",
        v.not_negative)
    failures: int = setting(3,
        "Consecutive failed rounds (any probe failing) before the server is killed.",
        v.in_range(1, 100))
    timeout: float = setting(5.0,
        "Seconds each probe (HTTP, XML-RPC, C-ECHO) may take before it counts as failed.",
        v.positive)
    term_wait: float = setting(20.0,
        "Seconds between SIGTERM and SIGKILL when killing a hung server that is stopping "
        "(see `react_wait`). A stopped (SIGSTOP) server gets SIGKILL at once.", v.positive)
    max_kills_per_hour: int = setting(3,
        "Kills allowed in any hour; beyond it the watchdog only alerts (no kill loop).",
        v.in_range(0, 100))
    min_free_mb: int = setting(200,
        "Below this much free space on the storage volume a restart cannot help: the "
        "watchdog reports instead of killing.", v.in_range(0, 2**40))
    roundtrip: bool = setting(False,
        "Also store a tiny instance to the server and find it in the index (C-STORE + "
        "C-FIND) each round.")
    on_kill: str = setting("",
        "A command run after each kill (and each refused kill), e.g. a mail or webhook "
        "script; it gets PACSD_WATCHDOG_EVENT and PACSD_WATCHDOG_REASON.")
    launchd_label: str = setting("",
        "Under launchd: restart with `launchctl kickstart -k` on this label instead of "
        "signals.")
    log_file: str = setting("",
        "The watchdog's log; empty means DATA/watchdog.log, '-' standard error only.")
    react_wait: float = setting(5.0,
        "Seconds after SIGTERM within which a hung server must show that it is stopping "
        "(its HTTP listener closes); one that shows nothing (hung, or SIGTERM ignored) gets "
        "SIGKILL then instead of after `term_wait`.", v.positive)


@dataclass(frozen=True)
class AuditSettings:
    """[audit]: the audit trail of every access and change (pacsd.audit, docs/audit.md)."""

    enabled: bool = setting(True,
        "Keep an audit record of every access and change (logins, queries, views, downloads, "
        "sends, retrieves, stores, corrections, deletions, restores), over HTTP, DICOM and "
        "the command line, as JSON lines under DATA/audit (`pacsd audit`, the admin page).")
    rotate_mb: int = setting(64,
        "An audit file is closed and a new one begun past this many MB.", v.in_range(1, 10000))
    rotate_days: float = setting(7.0,
        "An audit file is closed and a new one begun once its first record is this many days "
        "old.", v.positive)
    keep_days: float = setting(2192.0,
        "Closed audit files older than this many days are removed (2192: six years). 0: "
        "keep them all.", v.not_negative)
    syslog: str = setting("",
        "Also send every record to this syslog collector (an ATNA Audit Record Repository), "
        "HOST:PORT, as the DICOM audit message (PS3.15 A.5) in an RFC 5424 message. Empty: "
        "the files only.", v.syslog_target)
    syslog_protocol: str = setting("udp",
        "udp (RFC 5426), tcp or tls (RFC 5425, octet-counted frames).",
        v.one_of("udp", "tcp", "tls"))
    syslog_ca: str = setting("",
        "tls: CA certificate(s) (PEM) the collector's certificate must be signed by; empty: "
        "the system's CAs.")


@dataclass(frozen=True)
class WorklistSettings:
    """[worklist]: the Modality Worklist and MPPS (pacsd.dimse.worklist, docs/worklist.md)."""

    enabled: bool = setting(True,
        "Answer Modality Worklist queries (C-FIND, PS3.4 K) and Modality Performed Procedure "
        "Step messages (N-CREATE / N-SET, PS3.4 F) from the scheduled steps pacsd holds (fed "
        "by HL7 orders, the Worklist page or its API).")
    open: bool = setting(False,
        "Any calling AE title may query the worklist and report performed steps. Off: only "
        "nodes ([[nodes]] or the admin page) and this server's own AE title from this "
        "machine; others are answered 'abstract syntax not supported'.")
    expire_after_days: float = setting(2.0,
        "A scheduled step still not done this many days after its date and time is marked "
        "expired by housekeeping, and modalities no longer see it. 0: never.", v.not_negative)
    keep_days: float = setting(90.0,
        "Done, cancelled and expired steps (and the performed steps reported on them) are "
        "removed this many days after they ended. 0: keep them.", v.not_negative)
    max_results: int = setting(1000,
        "At most this many items in one worklist answer (a query that matches more gets "
        "the first ones by date and a log line).", v.in_range(1, 100000))


@dataclass(frozen=True)
class Hl7Settings:
    """[hl7]: orders and patient updates from a RIS or HIS, HL7 v2 over MLLP (pacsd.hl7)."""

    port: int = setting(0,
        "Listen for HL7 v2 messages (MLLP) on this TCP port, e.g. 2575. 0: off.", v.port)
    bind: str = setting("0.0.0.0",
        "Address the HL7 listener binds to.", v.bind)
    allowed_networks: tuple[str, ...] = setting((),
        "Addresses or networks (10.0.0.0/8) that may send HL7; empty allows any. Others are "
        "disconnected at once, with a log line.", v.network_list)
    max_message_kb: int = setting(1024,
        "Largest HL7 message accepted, in KiB; a longer one is answered AR and the "
        "connection closed.", v.in_range(1, 65536))
    max_connections: int = setting(16,
        "HL7 connections served at once; more are closed at once, with a log line.",
        v.in_range(1, 1000))
    idle_timeout: float = setting(300.0,
        "Seconds a connection may stay silent (or a message stay unfinished) before it is "
        "closed.", v.positive)
    encoding: str = setting("",
        "Character encoding of messages that do not say theirs in MSH-18 (e.g. cp1252, "
        "iso-8859-1); empty: UTF-8, then Latin-1 for bytes that are not UTF-8.",
        v.ascii_encoding)
    application: str = setting("PACSD",
        "Our application name in the ACKs we send (MSH-3).")


# The TOML sections, in the order the reference lists them.
SECTIONS: dict[str, type] = {
    "server": ServerSettings, "dicom": DicomSettings, "http": HttpSettings,
    "storage": StorageSettings, "index": IndexSettings, "hooks": HooksSettings,
    "routing": RoutingSettings, "log": LogSettings, "watchdog": WatchdogSettings,
}
SECTIONS["audit"] = AuditSettings
SECTIONS["worklist"] = WorklistSettings
SECTIONS["hl7"] = Hl7Settings


def _settings() -> tuple[Setting, ...]:
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            kind = tuple if typing.get_origin(hint) is tuple else hint
            out.append(Setting(section, f.name, kind, f.default, **f.metadata[_META]))
    return tuple(out)


SETTINGS: tuple[Setting, ...] = _settings()
BY_NAME: dict[tuple[str, str], Setting] = {(s.section, s.key): s for s in SETTINGS}
