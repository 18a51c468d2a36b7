"""The Config object and how it is built: defaults -> TOML file -> PACSD_* environment -> command
line, every value coerced to its setting's type and validated (sections.py declares them).

`load()` raises ConfigError at the first bad value, with one line that names the setting and
where it came from; `check()` goes on and returns every problem, for `pacsd config --check`.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pacsd.config import tables
from pacsd.config.sections import (
    AuditSettings,
    BY_NAME,
    DEFAULT_DATA,
    SECTIONS,
    SETTINGS,
    DicomSettings,
    HooksSettings,
    HttpSettings,
    IndexSettings,
    LogSettings,
    RoutingSettings,
    ServerSettings,
    Setting,
    StorageSettings,
    WatchdogSettings,
    WorklistSettings,
    Hl7Settings,
)
from pacsd.config.tables import Compression, Group, LabelRule, Node, Retention, Route, User
from pacsd.errors import ConfigError
from pacsd.config import index_url

CONFIG_FILE_NAME = "pacsd.toml"


@dataclass(frozen=True)
class Config:
    """The whole configuration: one frozen section per TOML section (`cfg.dicom.port`), the
    values resolved against the data folder, and the arrays of tables.

    Every setting is also readable flat, as `cfg.SECTION_KEY` (`cfg.dicom_port`; [server]'s
    without prefix: `cfg.housekeeping_interval`): properties generated from the sections below.
    """

    server: ServerSettings
    dicom: DicomSettings
    http: HttpSettings
    storage: StorageSettings
    index: IndexSettings
    hooks: HooksSettings
    routing: RoutingSettings
    log: LogSettings
    watchdog: WatchdogSettings
    audit: AuditSettings
    worklist: WorklistSettings
    hl7: Hl7Settings
    # Resolved once at load (absolute, defaults filled in), so later changes of the working
    # directory change nothing. They take the place of the flat [server] data, [storage] path
    # and [index] url, which stay in their sections as written.
    data: Path
    storage_path: Path
    index_url: str
    nodes: tuple[Node, ...] = ()
    users: tuple[User, ...] = ()
    routes: tuple[Route, ...] = ()
    retention: tuple[Retention, ...] = ()
    compression: tuple[Compression, ...] = ()
    groups: tuple[Group, ...] = ()
    label_rules: tuple[LabelRule, ...] = ()
    plugin_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = "defaults"   # the config file it came from, for messages
    # Where each setting's value came from ("section.key" -> the file, "$PACSD_...", "the
    # command line (--flag)"); a setting left at its default is absent. `pacsd config --list`.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)

    if TYPE_CHECKING:   # the generated flat properties (FLAT), which mypy cannot see
        def __getattr__(self, name: str) -> Any: ...

    def flat(self) -> dict[str, Any]:
        """Every value under its flat name (what `pacsd config` prints)."""
        out = {name: getattr(self, name) for name in FLAT}
        out.update((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                   if f.name not in SECTIONS and f.name != "origins")
        return out

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
    def watchdog_counts(self) -> Path:
        """JSON the watchdog keeps of what it did (kills, refusals, alerts); /metrics reads it."""
        return self.data / "watchdog-counts.json"

    @property
    def index_is_sqlite(self) -> bool:
        return index_url.kind(self.index_url) == index_url.SQLITE

    @property
    def index_path(self) -> Path:
        """The SQLite index file (only when index_is_sqlite)."""
        return index_url.sqlite_path(self.index_url)

    @property
    def index_label(self) -> str:
        """The index as logs and status show it: its file, or its URL without the password."""
        return str(self.index_path) if self.index_is_sqlite else index_url.redacted(self.index_url)

    @property
    def log_path(self) -> Path | None:
        """The log file, or None when the log goes to standard error only ("-")."""
        if self.log.file == "-":
            return None
        return Path(self.log.file).expanduser() if self.log.file else self.data / "pacsd.log"

    @property
    def watchdog_log_path(self) -> Path | None:
        """The watchdog's log file, or None for standard error only ("-")."""
        if self.watchdog.log_file == "-":
            return None
        return Path(self.watchdog.log_file).expanduser() if self.watchdog.log_file \
            else self.data / "watchdog.log"


def _flat_name(s: Setting) -> str:
    return s.key if s.section == "server" else f"{s.section}_{s.key}"


# The flat view: `cfg.dicom_port` reads `cfg.dicom.port`. A name Config defines itself (a
# resolved value: data, storage_path, index_url) is not generated.
FLAT: dict[str, Setting] = {_flat_name(s): s for s in SETTINGS
                            if _flat_name(s) not in Config.__dataclass_fields__}
for _name, _s in FLAT.items():
    setattr(Config, _name, property(operator.attrgetter(f"{_s.section}.{_s.key}"),
                                    doc=_s.help))


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


class _Problems:
    """Where the loader reports a bad value: raised at once by `load()`, gathered by
    `check()` (the bad value then keeps its default and loading goes on)."""

    def __init__(self, gather: bool) -> None:
        self.gather = gather
        self.found: list[ConfigError] = []

    def add(self, error: ConfigError) -> None:
        if not self.gather:
            raise error
        self.found.append(error)


def _build(path: Path | str | None, env: Mapping[str, str] | None,
           overrides: Mapping[str, Any] | None, problems: _Problems) -> Config:
    env = os.environ if env is None else env
    overrides = dict(overrides or {})
    values: dict[tuple[str, str], Any] = {(s.section, s.key): s.default for s in SETTINGS}
    origins: dict[str, str] = {}

    def data_hint() -> str:
        return str(overrides.get("server.data") or env.get("PACSD_SERVER_DATA")
                   or env.get("PACSD_DATA") or DEFAULT_DATA)

    def coerce(s: Setting, value: Any, origin: str) -> None:
        try:
            values[(s.section, s.key)] = _coerce(s, value, origin)
            origins[s.dotted] = origin
        except ConfigError as e:
            problems.add(e)

    file = path or env.get("PACSD_CONFIG")
    if not file:
        candidate = Path(data_hint()).expanduser().absolute() / CONFIG_FILE_NAME
        file = candidate if candidate.is_file() else None
    raw: dict[str, Any] = {}
    if file:
        try:
            raw = read_toml(Path(file))
        except ConfigError as e:
            problems.add(e)
    source = str(file) if file else "defaults"

    nodes: tuple[Node, ...] = ()
    users: tuple[User, ...] = ()
    routes: tuple[Route, ...] = ()
    retention: tuple[Retention, ...] = ()
    compression: tuple[Compression, ...] = ()
    groups: tuple[Group, ...] = ()
    label_rules: tuple[LabelRule, ...] = ()
    plugins: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        try:
            if section == "nodes":
                nodes = tables.nodes(table, source)
            elif section == "users":
                users = tables.users(table, source)
            elif section == "routes":
                routes = tables.routes(table, source)
            elif section == "retention":
                retention = tables.retention(table, source)
            elif section == "compression":
                compression = tables.compression(table, source)
            elif section == "groups":
                groups = tables.groups(table, source)
            elif section == "labels":
                label_rules = tables.label_rules(table, source)
            elif section == "plugin":   # [plugin.NAME]: each plugin's own settings, as written
                if not isinstance(table, dict) or not all(isinstance(v, dict)
                                                          for v in table.values()):
                    raise ConfigError(f"{source}: [plugin.NAME] tables only, one per plugin")
                plugins = {name: dict(v) for name, v in table.items()}
            elif not isinstance(table, dict):
                raise ConfigError(f"{source}: {section!r} must be a [section]")
            else:
                for key, value in table.items():
                    s = BY_NAME.get((section, key))
                    if s is None:
                        problems.add(ConfigError(f"{source}: unknown setting [{section}] {key}"))
                    else:
                        coerce(s, value, source)
        except ConfigError as e:
            problems.add(e)

    for s in SETTINGS:
        for name in (s.env, *s.env_aliases):
            if name in env:
                coerce(s, env[name], f"${name}")
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        s = BY_NAME[(section, key)]
        coerce(s, value, f"the command line ({s.cli or dotted})")

    sections = {name: cls(**{k: v for (sec, k), v in values.items() if sec == name})
                for name, cls in SECTIONS.items()}
    server, storage, index, http, dicom = (sections[n] for n in
                                           ("server", "storage", "index", "http", "dicom"))
    data = Path(server.data).expanduser().absolute()
    storage_path = Path(storage.path).expanduser().absolute() if storage.path \
        else data / "storage"
    index_url = index.url or f"sqlite:///{data / 'index.sqlite3'}"
    for problem in (
        (http.cert == "") != (http.key == "")
        and "[http] cert and key: set both for HTTPS, or neither",
        (dicom.tls_cert == "") != (dicom.tls_key == "")
        and "[dicom] tls_cert and tls_key: set both for DICOM TLS, or neither",
        dicom.tls_ca and not dicom.tls_cert
        and "[dicom] tls_ca needs tls_cert and tls_key (client certificates are only asked "
            "for over TLS)",
        # HTTP beyond loopback needs an administrator: checked when the server starts
        # (Accounts.check_http_bind), since those added on the admin page count as well.
    ):
        if problem:
            problems.add(ConfigError(str(problem)))
    return Config(**sections, data=data, storage_path=storage_path, index_url=index_url,
                  nodes=nodes, users=users, routes=routes, retention=retention,
                  compression=compression, groups=groups, label_rules=label_rules,
                  plugin_settings=plugins,
                  source=source, origins=origins)


def load(path: Path | str | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the Config. `overrides` maps "section.key" to values from the command line.

    The file is `path`, else $PACSD_CONFIG, else DATA/pacsd.toml when it exists.
    """
    return _build(path, env, overrides, _Problems(gather=False))


def check(path: Path | str | None = None, env: Mapping[str, str] | None = None,
          overrides: Mapping[str, Any] | None = None) -> tuple[Config, list[ConfigError]]:
    """As `load()`, but every problem rather than the first: (the Config built from the values
    that were good, the others left at their defaults; the problems, one line each)."""
    problems = _Problems(gather=True)
    cfg = _build(path, env, overrides, problems)
    return cfg, problems.found


def _not_writable(folder: Path) -> str | None:
    """Why `folder` cannot be written (or created), or None. Creating it is the server's job:
    a missing folder whose nearest existing parent is a writable folder is fine."""
    path = folder
    while not path.exists():
        if path.parent == path:
            break
        path = path.parent
    if not path.is_dir():
        return (f"{path} is not a folder" if path == folder else
                f"cannot be created: {path} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        return (f"{path} is not writable" if path == folder else
                f"cannot be created: {path} is not writable")
    return None


def folder_problems(cfg: Config) -> list[str]:
    """The folders the server writes to that it could not: data, storage, the SQLite index's
    folder, the log's folder; one line each."""
    folders: dict[Path, str] = {}
    folders.setdefault(cfg.data, "[server] data")
    folders.setdefault(cfg.storage_path, "[storage] path")
    if cfg.index_is_sqlite:
        folders.setdefault(cfg.index_path.parent, "[index] url (the SQLite index's folder)")
    if cfg.log_path is not None:
        folders.setdefault(cfg.log_path.parent, "[log] file (its folder)")
    out = []
    for folder, what in folders.items():
        why = _not_writable(folder)
        if why:
            out.append(f"{what}: {folder}: {why}")
    return out


def describe() -> str:
    """The settings as a Markdown table (the manual's settings reference)."""
    rows = ["| setting | env | flag | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = list(s.default) if isinstance(s.default, tuple) else s.default
        flag = f"`{s.cli}`" if s.cli else ""
        rows.append(f"| `[{s.section}] {s.key}` | `{s.env}` | {flag} | `{default!r}` | {s.help} |")
    return "\n".join(rows)
