"""Leases: jobs that one node of several runs (housekeeping, the stable-study watcher), held in
the database (table pacsd_lease) and decided by its clock; each node's liveness mark (`probe`)
and the values every node of one index shares (`shared_value`).
"""

from __future__ import annotations

import time

from pacsd.index import backends
from pacsd.index.models import Meta_, database, reading
from pacsd.index.writer import Writer


class Leases(Writer):
    """Leases, liveness marks and shared values; part of pacsd.index.Index."""

    def lease(self, name: str, seconds: float) -> bool:
        """Take, or renew, the lease `name` for this node for `seconds`; whether we hold it.
        A lease whose holder stopped renewing (killed, hung) passes to the next taker once it
        has expired, by the database's clock."""
        def work() -> bool:
            db = database.obj
            p, now = db.param, backends.now_epoch_sql(db)
            db.execute_sql(
                f"INSERT INTO pacsd_lease (name, holder, expires) VALUES ({p}, {p}, {now} + {p}) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires = excluded.expires WHERE pacsd_lease.holder = excluded.holder "
                f"OR pacsd_lease.expires < {now}", (name, self.node, float(seconds)))
            row = db.execute_sql(f"SELECT holder FROM pacsd_lease WHERE name = {p}",
                                 (name,)).fetchone()
            return row is not None and row[0] == self.node
        return bool(self.submit(work))

    def release(self, name: str) -> None:
        def work() -> None:
            p = database.obj.param
            database.obj.execute_sql(f"DELETE FROM pacsd_lease WHERE name = {p} AND "
                                     f"holder = {p}", (name, self.node))
        self.submit(work)

    def leases(self) -> list[tuple[str, str, float]]:
        """The leases held now: (name, holder, seconds until they expire)."""
        with reading():
            db = database.obj
            return [(n, h, float(left)) for n, h, left in db.execute_sql(
                f"SELECT name, holder, expires - {backends.now_epoch_sql(db)} FROM pacsd_lease "
                f"WHERE expires >= {backends.now_epoch_sql(db)} ORDER BY name").fetchall()]

    def shared_value(self, key: str, first: str) -> str:
        """pacsd_meta[key], set to `first` unless a node set it before: one value (a secret,
        say) for every node of an index."""
        def work() -> str:
            Meta_.insert(key=key, value=first).on_conflict_ignore().execute()
            return str(Meta_.get(Meta_.key == key).value)
        return self.submit(work)

    def lease_holder(self, name: str) -> str | None:
        """Who holds `name` now (an expired lease counts as nobody's)."""
        with reading():
            db = database.obj
            p = db.param
            row = db.execute_sql(f"SELECT holder FROM pacsd_lease WHERE name = {p} AND "
                                 f"expires >= {backends.now_epoch_sql(db)}", (name,)).fetchone()
        return None if row is None else row[0]

    # --- this node's liveness ---------------------------------------------------------------

    def probe(self, timeout: float = 1.0) -> None:
        """A read, and a small write through the writer (this node's last probe time), within
        `timeout`; raises IndexUnavailable or TimeoutError."""
        with reading():
            Meta_.get_or_none(Meta_.key == "schema_version")
        # UTC: nodes in other time zones compare these marks (pacsd.storage.housekeeping).
        key, now = f"alive:{self.node}"[:64], time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        self.submit(lambda: Meta_.insert(key=key, value=now).on_conflict(
            conflict_target=[Meta_.key], update={Meta_.value: now}).execute(), timeout=timeout)
