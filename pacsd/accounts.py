"""Who we talk to and who may log in: the accounts of DICOM nodes and of web users.

Two sources, merged: the config file's [[nodes]] / [[users]] (read-only here: the file is the
IT person's, and rewriting it would lose their comments) and those added on the admin page,
kept in the index database (tables pacsd_node / pacsd_user) so that every pacsd sharing one
index sees them and a restart keeps them. A name (node or user) exists in one source only.

Readers get an immutable snapshot, re-read from the database at most every few seconds (other
processes may write) and at once after our own writes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any


from pacsd.config import NODE_RIGHTS, Config, ConfigError, Group, Node, User, node_from
from pacsd.errors import PacsError
from pacsd.index import Index
from pacsd.index.models import NodeRow, UserRow, reading

log = logging.getLogger(__name__)

CONFIG, ADMIN = "config", "admin"
REFRESH_S = 5.0
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# How to get an administrator back, without the web side: said wherever one is missing. The
# file's [[users]] count as much as the admin page's, and a name there wins over the same name
# added on the admin page, so this also resets a forgotten administrator password.
NO_ADMIN_HINT = ("add one on the admin page while pacsd listens on 127.0.0.1 only, or run "
                 "`pacsd passwd NAME --admin` and paste the [[users]] entry it prints into "
                 "the configuration file, then restart pacsd")


class AccountError(PacsError):
    """A node or user that cannot be added, changed or removed as asked."""

    http_status = 400


class Conflict(AccountError):
    http_status = 409


class NotFound(AccountError):
    http_status = 404


@dataclass(frozen=True)
class Snapshot:
    nodes: tuple[tuple[Node, str], ...]    # (node, source)
    users: dict[str, tuple[User, str]]     # name -> (user, source)
    logins: dict[str, User]                # name -> user: what every HTTP request looks at


class Accounts:
    def __init__(self, cfg: Config, index: Index) -> None:
        self.cfg = cfg
        self.index = index
        self._snap: Snapshot | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()

    def open(self) -> "Accounts":
        self._reload()
        return self

    # --- reading ------------------------------------------------------------------------------

    def _reload(self) -> Snapshot:
        with reading():
            rows = list(NodeRow.select().order_by(NodeRow.name))
            user_rows = list(UserRow.select().order_by(UserRow.name))
        nodes = [(n, CONFIG) for n in self.cfg.nodes]
        nodes += [(Node(name=r.name, aet=r.aet, host=r.host, port=r.port,
                        allow_find=bool(r.allow_find), allow_get=bool(r.allow_get),
                        allow_move=bool(r.allow_move), allow_store=bool(r.allow_store),
                        wado_url=r.wado_url or ""), ADMIN)
                  for r in rows if not any(n.name == r.name for n in self.cfg.nodes)]
        users = {u.name: (u, CONFIG) for u in self.cfg.users}
        for r in user_rows:
            users.setdefault(r.name, (User(r.name, r.password_hash, bool(r.admin)), ADMIN))
        snap = Snapshot(tuple(nodes), users, {name: u for name, (u, _) in users.items()})
        with self._lock:
            self._snap, self._read_at = snap, time.monotonic()
        return snap

    def snapshot(self) -> Snapshot:
        with self._lock:
            snap, fresh = self._snap, time.monotonic() - self._read_at < REFRESH_S
        if snap is not None and fresh:
            return snap
        try:
            return self._reload()
        except Exception:   # the index is busy or gone: keep serving what we knew
            if snap is None:
                raise
            return snap

    def nodes(self) -> list[tuple[Node, str]]:
        return list(self.snapshot().nodes)

    def node(self, name: str) -> Node | None:
        """A node by its name or, failing that, its AE title."""
        name = (name or "").strip()
        nodes = [n for n, _ in self.snapshot().nodes]
        return next((n for n in nodes if n.name == name), None) or self.node_by_aet(name)

    def node_by_aet(self, aet: str) -> Node | None:
        aet = (aet or "").strip()
        return next((n for n, _ in self.snapshot().nodes if n.aet == aet), None)

    def users(self) -> dict[str, tuple[User, str]]:
        return dict(self.snapshot().users)

    def logins(self) -> dict[str, User]:
        """Name -> user, shared and never changed (a new snapshot replaces it)."""
        return self.snapshot().logins

    def user(self, name: str) -> User | None:
        hit = self.snapshot().users.get(name)
        return hit[0] if hit else None

    # --- who sees what ([[groups]]) -------------------------------------------------------------

    def groups_of_user(self, user: User | None) -> tuple[Group, ...]:
        """The [[groups]] whose scope limits what a web user sees (pacsd.query.scope.of_groups);
        none (everything) for administrators and when no users exist."""
        if user is None or user.admin:
            return ()
        return tuple(g for g in self.cfg.groups if user.name in g.users)

    def groups_of_caller(self, aet: str) -> tuple[Group, ...]:
        """The same for a DICOM caller: the groups naming its node by name or AE title."""
        aet = (aet or "").strip()
        names = {aet}
        node = self.node_by_aet(aet)
        if node is not None:
            names.add(node.name)
        return tuple(g for g in self.cfg.groups if names & set(g.nodes))

    def may_share(self, user: User | None) -> bool:
        """Administrators, and users of a group with share = true."""
        if user is None or user.admin:
            return True
        return any(g.share and user.name in g.users for g in self.cfg.groups)

    # --- writing (admin page) -----------------------------------------------------------------

    def _source(self, kind: str, name: str) -> str | None:
        snap = self.snapshot()
        if kind == "node":
            return next((s for n, s in snap.nodes if n.name == name), None)
        hit = snap.users.get(name)
        return hit[1] if hit else None

    def _writable(self, kind: str, name: str) -> None:
        source = self._source(kind, name)
        if source is None:
            raise NotFound(f"no {kind} named {name!r}")
        if source == CONFIG:
            raise Conflict(f"{kind} {name!r} comes from the config file {self.cfg.source}; "
                           "change it there")

    def _write(self, work: Any) -> Any:
        try:
            return self.index.submit(work)
        finally:
            self._reload()

    def save_node(self, item: dict[str, Any], replacing: str | None = None) -> Node:
        """Add a node (replacing=None) or change the admin-page node named `replacing`."""
        if replacing is not None:
            self._writable("node", replacing)
            # A change that does not mention a switch or the WADO address keeps it (the admin
            # page edits only the address; the rest is set through the API). Checked again
            # below: a kept wado_url must still be on the node's host.
            old = next((n for n, _ in self.snapshot().nodes if n.name == replacing), None)
            if isinstance(item, dict) and old is not None:
                item = {**{k: getattr(old, k) for k in (*NODE_RIGHTS, "wado_url")}, **item}
        try:
            node = node_from(item)
        except KeyError as e:
            raise AccountError(f"missing {e.args[0]!r}") from None
        except ValueError as e:
            raise AccountError(str(e)) from None
        for other, _ in self.snapshot().nodes:
            if other.name == replacing:
                continue
            if other.name == node.name or other.aet == node.aet:
                raise Conflict(f"a node named {other.name!r} with AE title {other.aet!r} exists")

        def work() -> None:
            if replacing is not None:
                NodeRow.delete().where(NodeRow.name == replacing).execute()
            NodeRow.create(name=node.name, aet=node.aet, host=node.host, port=node.port,
                           wado_url=node.wado_url or None,
                           **{k: getattr(node, k) for k in NODE_RIGHTS})
        self._write(work)
        return node

    def remove_node(self, name: str) -> None:
        self._writable("node", name)
        self._write(lambda: NodeRow.delete().where(NodeRow.name == name).execute())

    # --- administrators: never none (issue 19) -------------------------------------------------
    #
    # With no users at all the pages are open (HTTP on loopback only); the first user turns
    # log-in on, so a first user who is not an administrator would lock everyone out of the
    # admin page. Hence: the first user is always an administrator, and the last administrator
    # can be neither demoted nor removed. Enforced here, inside the index write (one writer
    # thread serializes them), so that two administrators demoting each other at once cannot
    # both succeed, whatever front end asks.

    def _admins_besides(self, name: str) -> int:
        """Administrators other than `name`, read inside the write transaction. A name in the
        file hides the same name added on the admin page (see _reload)."""
        file_names = {u.name for u in self.cfg.users}
        rows = UserRow.select(UserRow.name).where(UserRow.admin == True)  # noqa: E712
        return (sum(1 for u in self.cfg.users if u.admin and u.name != name)
                + sum(1 for r in rows if r.name != name and r.name not in file_names))

    def has_admin(self) -> bool:
        return any(u.admin for u, _ in self.snapshot().users.values())

    def check_http_bind(self, bind: str) -> None:
        """Refuse to serve HTTP beyond loopback unless an administrator exists, in the config
        file's [[users]] or added on the admin page (the same: both log in). Without one, the
        pages would be open to the network, or nobody could run them."""
        if self.has_admin():
            return
        if bind in LOOPBACK:
            if self.snapshot().users:   # log-in is on, and nobody may run the admin page
                log.warning("there are users but no administrator, so nobody can use the admin "
                            "page: %s", NO_ADMIN_HINT.split(", or ", 1)[1])
            return
        raise ConfigError(
            f"[http] bind = {bind!r} reaches beyond this machine, and there is no "
            f"administrator: {NO_ADMIN_HINT}, or bind to 127.0.0.1")

    def _last_admin(self, name: str) -> Conflict:
        return Conflict(f"{name!r} is the last administrator: make another user an "
                        "administrator first (without one, nobody could run this page)")

    def save_user(self, name: str, *, password_hash: str | None = None,
                  admin: bool | None = None, new: bool) -> User:
        name = (name or "").strip()
        if not name or len(name) > 64 or ":" in name or any(ord(c) < 0x20 for c in name):
            raise AccountError("a user name is 1-64 characters, without ':'")
        if new:
            if self._source("user", name) is not None:
                raise Conflict(f"a user named {name!r} exists")
            if not password_hash:
                raise AccountError("a new user needs a password")

            def add() -> User:
                # The first user (none in the file, none in the index) is an administrator,
                # whatever the form said; so is any user added while there is no administrator.
                made_admin = bool(admin) or self._admins_besides(name) == 0
                UserRow.create(name=name, password_hash=password_hash, admin=made_admin)
                return User(name, password_hash, made_admin)
            user: User = self._write(add)
            return user
        self._writable("user", name)

        def change() -> User:
            row = UserRow.get_or_none(UserRow.name == name)
            if row is None:
                raise NotFound(f"no user named {name!r}")
            keep_admin = bool(row.admin) if admin is None else bool(admin)
            if row.admin and not keep_admin and self._admins_besides(name) == 0:
                raise self._last_admin(name)
            changed = User(name, password_hash or row.password_hash, keep_admin)
            UserRow.update(password_hash=changed.password_hash, admin=changed.admin) \
                .where(UserRow.name == name).execute()
            return changed
        changed: User = self._write(change)
        return changed

    def remove_user(self, name: str) -> None:
        self._writable("user", name)

        def remove() -> None:
            row = UserRow.get_or_none(UserRow.name == name)
            if row is not None and row.admin and self._admins_besides(name) == 0:
                raise self._last_admin(name)
            UserRow.delete().where(UserRow.name == name).execute()
        self._write(remove)
