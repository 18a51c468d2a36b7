"""The arrays of tables of the config file: [[nodes]], [[routes]], [[users]], [[retention]],
[[compression]], [[groups]], [[labels]], each read into frozen dataclasses, each bad entry
refused with a ConfigError naming it."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, replace
from typing import Any, Iterator

from pacsd.config.validators import valid_aet
from pacsd.errors import ConfigError


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
    # Its WADO-URI endpoint (XML-RPC Retrieve with retrieveMode 2), "" for none. Its host is
    # the node's own host (checked in node_from), so no caller can point a fetch elsewhere.
    wado_url: str = ""
    # An upstream archive (PACS On-Demand, docs/on-demand.md): searches here fall through to
    # it. Set in the config file only (the admin page's nodes are never upstream).
    on_demand: bool = False
    on_demand_order: int = 0      # preference among upstreams, lower first
    on_demand_retrieves: int = 2  # retrieves from it at once (for fetching on open)


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
class Retention:
    """A retention rule ([[retention]]): studies received more than `older_than_days` ago
    (and of these modalities, from these callers, while free space is below a share, when
    given) go to the recycle bin. Off until `enabled`: `pacsd retention plan` shows first what
    it would take."""

    name: str
    older_than_days: int
    modalities: tuple[str, ...] = ()
    calling_aets: tuple[str, ...] = ()
    free_below_percent: float | None = None
    enabled: bool = False


@dataclass(frozen=True)
class Compression:
    """A compression rule ([[compression]]): stored uncompressed images received more than
    `older_than_days` ago (of these modalities, when given) are re-encoded losslessly (JPEG-LS),
    verified pixel for pixel, in the background."""

    name: str
    older_than_days: int = 0
    modalities: tuple[str, ...] = ()


@dataclass(frozen=True)
class User:
    """A web / XML-RPC user; `password_hash` as made by `pacsd passwd`."""

    name: str
    password_hash: str
    admin: bool = False


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
    wado_url = wado_url_of(host, item.get("wado_url"))
    return Node(name=name, aet=aet, host=host, port=port, transfer_syntaxes=syntaxes,
                wado_url=wado_url, **rights)


NODE_RIGHTS = ("allow_find", "allow_get", "allow_move", "allow_store")


def wado_url_of(host: str, raw: Any) -> str:
    """[[nodes]] wado_url: "" (none), or an http(s) WADO-URI endpoint on the node's own `host`
    (compared as written, case-insensitively: no DNS), without credentials, query or fragment
    (pacsd adds the query); ValueError otherwise."""
    if raw is None or raw == "":
        return ""
    if not isinstance(raw, str) or len(raw) > 1024:
        raise ValueError("wado_url must be a URL of at most 1024 characters")
    url = raw.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port   # raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"wado_url {url!r} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"wado_url must be http:// or https://, not {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("wado_url must not carry credentials, a query or a fragment")
    if (parts.hostname or "").lower() != host.lower():
        raise ValueError(f"wado_url's host {parts.hostname or ''!r} is not the node's host "
                         f"{host!r}: a node's WADO server must be on the node itself")
    return url


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


ON_DEMAND_KEYS = ("on_demand", "on_demand_order", "on_demand_retrieves")


def _on_demand(item: dict[str, Any], position: int) -> dict[str, Any]:
    """A [[nodes]] table's upstream keys (config file only); ValueError if bad."""
    on = item.get("on_demand", False)
    if not isinstance(on, bool):
        raise ValueError(f"on_demand must be true or false, not {on!r}")
    out: dict[str, Any] = {"on_demand": on}
    for key, default, low, high in (("on_demand_order", position, -10_000, 10_000),
                                    ("on_demand_retrieves", 2, 1, 16)):
        value = item.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{key} must be a whole number from {low} to {high}, not "
                             f"{value!r}")
        out[key] = value
    if not on:
        if any(k in item for k in ON_DEMAND_KEYS[1:]):
            raise ValueError("on_demand_order and on_demand_retrieves need on_demand = true")
        return {}   # not an upstream: the defaults, as a node of the admin page has
    return out


def nodes(raw: Any, origin: str) -> tuple[Node, ...]:
    nodes: list[Node] = []
    for where, item in _tables(raw, origin, "nodes",
                               {"name", "aet", "host", "port", "transfer_syntaxes", "wado_url",
                                *NODE_RIGHTS, *ON_DEMAND_KEYS}):
        try:
            node = replace(node_from(item), **_on_demand(item, len(nodes) + 1))
        except KeyError as e:
            raise ConfigError(f"{where}: missing {e.args[0]!r}") from None
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if any(n.name == node.name or n.aet == node.aet for n in nodes):
            raise ConfigError(f"{where}: name {node.name!r} or AE title {node.aet!r} appears "
                              "twice")
        nodes.append(node)
    return tuple(nodes)


def _match(where: str, raw: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A rule's `match` table: { Keyword or tag = pattern or [patterns] }."""
    from pydicom.datadict import keyword_for_tag, tag_for_keyword
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: match must be a table: {{ Modality = \"CT\" }}")
    keys = []
    for key, patterns in raw.items():
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
    return tuple(keys)


def _callers(where: str, raw: Any, key: str = "calling_aet") -> tuple[str, ...]:
    callers = [raw] if isinstance(raw, str) else raw
    if not isinstance(callers, list) or not all(isinstance(c, str) for c in callers):
        raise ConfigError(f"{where}: {key} must be an AE title or a list of them")
    try:
        return tuple(valid_aet(c) for c in callers)
    except ValueError as e:
        raise ConfigError(f"{where}: {key} {e}") from None


def _strings(where: str, raw: Any, key: str) -> tuple[str, ...]:
    value = [raw] if isinstance(raw, str) else raw
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: {key} must be a value or a list of values")
    return tuple(v.strip() for v in value)


LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.:/+-]{0,63}")


def valid_label(text: Any) -> str:
    """A study label: 1-64 letters, digits, spaces and _ . : / + -, starting with a letter or a
    digit; ValueError otherwise."""
    label = text.strip() if isinstance(text, str) else ""
    if not LABEL.fullmatch(label):
        raise ValueError(f"{str(text)[:80]!r} is not a label (1-64 letters, digits, spaces "
                         "and _ . : / + -)")
    return label


@dataclass(frozen=True)
class Group:
    """Who sees what ([[groups]]): its users and nodes see the studies carrying one of
    `labels`, or referred by a physician matching `referring`, or received from
    `calling_aets`; nothing else. A user or node in no group sees every study, as before
    groups existed (unless [access] ungrouped = "none"); administrators see all."""

    name: str
    users: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()             # names or AE titles
    labels: tuple[str, ...] = ()
    referring: tuple[str, ...] = ()         # DICOM wildcard patterns, case ignored
    calling_aets: tuple[str, ...] = ()
    share: bool = False                     # its users may make share links


def groups(raw: Any, origin: str) -> tuple[Group, ...]:
    out: list[Group] = []
    for where, item in _tables(raw, origin, "groups",
                               {"name", "users", "nodes", "labels", "referring",
                                "calling_aet", "share"}):
        name = str(item.get("name", "")).strip()
        if not name or any(g.name == name for g in out):
            raise ConfigError(f"{where}: a name, unique among the groups, is required")
        try:
            labels = tuple(valid_label(v) for v in _strings(where, item.get("labels", []),
                                                            "labels"))
        except ValueError as e:
            raise ConfigError(f"{where}: labels: {e}") from None
        share = item.get("share", False)
        if not isinstance(share, bool):
            raise ConfigError(f"{where}: share must be true or false")
        out.append(Group(name=name, users=_strings(where, item.get("users", []), "users"),
                         nodes=_strings(where, item.get("nodes", []), "nodes"), labels=labels,
                         referring=_strings(where, item.get("referring", []), "referring"),
                         calling_aets=_callers(where, item.get("calling_aet", [])),
                         share=share))
    return tuple(out)


@dataclass(frozen=True)
class LabelRule:
    """A label given on ingest ([[labels]]) to the study of each instance that matches, as
    [[routes]] match (calling AE titles, any attribute with DICOM wildcards)."""

    label: str
    calling_aets: tuple[str, ...] = ()
    match: tuple[tuple[str, tuple[str, ...]], ...] = ()


def label_rules(raw: Any, origin: str) -> tuple[LabelRule, ...]:
    out: list[LabelRule] = []
    for where, item in _tables(raw, origin, "labels", {"label", "calling_aet", "match"}):
        try:
            label = valid_label(item.get("label"))
        except ValueError as e:
            raise ConfigError(f"{where}: label: {e}") from None
        callers = _callers(where, item.get("calling_aet", []))
        match = _match(where, item.get("match", {}))
        if not callers and not match:
            raise ConfigError(f"{where}: say what takes the label (calling_aet, match): a rule "
                              "without either would label every study")
        out.append(LabelRule(label=label, calling_aets=callers, match=match))
    return tuple(out)


def routes(raw: Any, origin: str) -> tuple[Route, ...]:
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
        calling_aets = _callers(where, item.get("calling_aet", []))
        keys = _match(where, item.get("match", {}))
        routes.append(Route(name=name, to=to, when=when, calling_aets=calling_aets,
                            match=tuple(keys)))
    return tuple(routes)


def retention(raw: Any, origin: str) -> tuple[Retention, ...]:
    rules: list[Retention] = []
    for where, item in _tables(raw, origin, "retention",
                               {"name", "older_than_days", "modality", "calling_aet",
                                "free_below_percent", "enabled"}):
        name = str(item.get("name", "")).strip()
        if not name or any(r.name == name for r in rules):
            raise ConfigError(f"{where}: a name, unique among the rules, is required")
        days = item.get("older_than_days")
        if not isinstance(days, int) or isinstance(days, bool) or days < 1:
            raise ConfigError(f"{where}: older_than_days (a whole number of days, 1 or more) "
                              "is required: a rule never takes what was just received")
        lists = {}
        for key in ("modality", "calling_aet"):
            value = item.get(key, [])
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip()
                                                      for v in value):
                raise ConfigError(f"{where}: {key} must be a value or a list of values")
            lists[key] = tuple(v.strip() for v in value)
        try:
            callers = tuple(valid_aet(c) for c in lists["calling_aet"])
        except ValueError as e:
            raise ConfigError(f"{where}: calling_aet {e}") from None
        free = item.get("free_below_percent")
        if free is not None and (isinstance(free, bool) or not isinstance(free, (int, float))
                                 or not 0 < free <= 100):
            raise ConfigError(f"{where}: free_below_percent must be a share of the volume, "
                              "above 0 and at most 100")
        enabled = item.get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}: enabled must be true or false")
        rules.append(Retention(name=name, older_than_days=days,
                               modalities=tuple(m.upper() for m in lists["modality"]),
                               calling_aets=callers,
                               free_below_percent=None if free is None else float(free),
                               enabled=enabled))
    return tuple(rules)


def compression(raw: Any, origin: str) -> tuple[Compression, ...]:
    rules: list[Compression] = []
    for where, item in _tables(raw, origin, "compression",
                               {"name", "older_than_days", "modality"}):
        name = str(item.get("name", "")).strip()
        if not name or any(r.name == name for r in rules):
            raise ConfigError(f"{where}: a name, unique among the rules, is required")
        days = item.get("older_than_days", 0)
        if not isinstance(days, int) or isinstance(days, bool) or days < 0:
            raise ConfigError(f"{where}: older_than_days must be a whole number of days")
        value = item.get("modality", [])
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip()
                                                  for v in value):
            raise ConfigError(f"{where}: modality must be a value or a list of values")
        rules.append(Compression(name=name, older_than_days=days,
                                 modalities=tuple(v.strip().upper() for v in value)))
    return tuple(rules)


def users(raw: Any, origin: str) -> tuple[User, ...]:
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
