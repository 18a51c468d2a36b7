"""The outbox: the routing queue, durable in the index (table pacsd_route_job), and the studies
waiting to become stable (pacsd_study_activity).

A job is queued in the same transaction as what caused it: the instance's row (Index.add) or
the study turning stable (`take_stable`), so a crash never loses one. A node claims jobs for a
while (`LEASE_S`, by the database's clock; renewed while it sends); a node that dies leaves its
claims to expire and another node, or itself after a restart, sends them again. Sending twice
is harmless in DICOM (the receiver keeps one copy); not sending is not.

States: queued (waiting, maybe after failures) -> done, or dead after `max_attempts` tries
(the dead-letter list: the admin page and `pacsd queue` show it and can queue it again).
Writes go through the index's writer, reads through `reading()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pacsd.index import backends
from pacsd.index import Index
from pacsd.index.models import database, reading

LEASE_S = 600.0      # a claim lasts this long unless renewed
MAX_DELAY_S = 3600.0
STATES = ("queued", "done", "dead")


@dataclass(frozen=True)
class Job:
    id: int
    route: str
    destination: str
    study_uid: str
    sop_uid: str          # empty: the whole study
    state: str = "queued"
    attempts: int = 0
    last_error: str = ""
    next_try_in: float = 0.0   # seconds from now (negative: due)
    created: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "route": self.route, "destination": self.destination,
                "study_uid": self.study_uid, "sop_uid": self.sop_uid, "state": self.state,
                "attempts": self.attempts, "last_error": self.last_error,
                "next_try_in": round(self.next_try_in, 1), "created": self.created}


_COLUMNS = "id, route, destination, study_uid, sop_uid, state, attempts, last_error"


class RouteQueue:
    def __init__(self, index: Index) -> None:
        self.index = index

    def _now(self) -> str:
        return backends.now_epoch_sql(database.obj)

    # --- the sending side -------------------------------------------------------------------

    def claim(self, destination: str, limit: int = 1000) -> list[Job]:
        """The due jobs for `destination` of one study (the one waiting longest), at most
        `limit`, claimed by this node: they go out over one association."""
        def work() -> list[Job]:
            db = database.obj
            p, now = db.param, self._now()
            skip = " FOR UPDATE SKIP LOCKED" if self.index.backend == backends.POSTGRESQL else ""
            due = (f"state = 'queued' AND destination = {p} AND next_try <= {now} AND "
                   f"claimed_until < {now}")
            rows = db.execute_sql(
                f"UPDATE pacsd_route_job SET claimed_by = {p}, claimed_until = {now} + {p}, "
                f"updated = {now} WHERE id IN (SELECT id FROM pacsd_route_job WHERE {due} AND "
                f"study_uid = (SELECT study_uid FROM pacsd_route_job WHERE {due} "
                f"ORDER BY next_try, id LIMIT 1) ORDER BY id LIMIT {p}{skip}) "
                f"RETURNING {_COLUMNS}",
                (self.index.node, LEASE_S, destination, destination, limit)).fetchall()
            return sorted((Job(*r) for r in rows), key=lambda j: j.id)
        return self.index.submit(work)

    def renew(self, job_id: int) -> None:
        def work() -> None:
            p, now = database.obj.param, self._now()
            database.obj.execute_sql(
                f"UPDATE pacsd_route_job SET claimed_until = {now} + {p} WHERE id = {p} AND "
                f"claimed_by = {p}", (LEASE_S, job_id, self.index.node))
        self.index.submit(work)

    def done(self, job_id: int) -> None:
        def work() -> None:
            p, now = database.obj.param, self._now()
            database.obj.execute_sql(
                f"UPDATE pacsd_route_job SET state = 'done', claimed_by = '', claimed_until = 0, "
                f"last_error = '', updated = {now} WHERE id = {p}", (job_id,))
        self.index.submit(work)

    def failed(self, job: Job, error: str, retry_delay: float, max_attempts: int) -> str:
        """Count a failed try: the job waits `retry_delay * 2**(tries-1)` seconds (at most an
        hour) before the next, or goes dead after `max_attempts`. Its new state."""
        attempts = job.attempts + 1
        state = "dead" if attempts >= max_attempts else "queued"
        delay = min(retry_delay * 2 ** (attempts - 1), MAX_DELAY_S)

        def work() -> None:
            p, now = database.obj.param, self._now()
            database.obj.execute_sql(
                f"UPDATE pacsd_route_job SET state = {p}, attempts = {p}, last_error = {p}, "
                f"next_try = {now} + {p}, claimed_by = '', claimed_until = 0, updated = {now} "
                f"WHERE id = {p}", (state, attempts, error[:2000], delay, job.id))
        self.index.submit(work)
        return state

    def release_mine(self) -> int:
        """Give back the claims this node holds (it restarted: nothing of it is in flight)."""
        def work() -> int:
            p = database.obj.param
            cur = database.obj.execute_sql(
                "UPDATE pacsd_route_job SET claimed_by = '', claimed_until = 0 WHERE "
                f"claimed_by = {p} AND state = 'queued'", (self.index.node,))
            return cur.rowcount
        return int(self.index.submit(work) or 0)

    def destinations(self) -> list[str]:
        """Destinations with queued jobs due now."""
        with reading():
            db = database.obj
            rows = db.execute_sql(
                f"SELECT DISTINCT destination FROM pacsd_route_job WHERE state = 'queued' AND "
                f"next_try <= {self._now()} AND claimed_until < {self._now()}").fetchall()
        return [r[0] for r in rows]

    def next_due_in(self, horizon: float) -> float:
        """Seconds until the next queued job comes due (0 if one is due), at most `horizon`."""
        with reading():
            db = database.obj
            # A claimed job comes due again only when its claim expires.
            row = db.execute_sql(
                "SELECT MIN(CASE WHEN claimed_until > next_try THEN claimed_until ELSE next_try "
                f"END) - {self._now()} FROM pacsd_route_job WHERE state = 'queued'").fetchone()
        return horizon if row is None or row[0] is None else max(0.0, min(horizon, row[0]))

    # --- studies turning stable -------------------------------------------------------------

    def stable_studies(self, quiet_s: float, limit: int = 100) -> list[str]:
        """Studies without a new instance for `quiet_s` seconds, oldest first."""
        with reading():
            db = database.obj
            rows = db.execute_sql(
                f"SELECT study_uid FROM pacsd_study_activity WHERE last_received < "
                f"{self._now()} - {db.param} ORDER BY last_received LIMIT {db.param}",
                (quiet_s, limit)).fetchall()
        return [r[0] for r in rows]

    def take_stable(self, study_uid: str, quiet_s: float,
                    jobs: list[tuple[str, str]]) -> bool:
        """Mark the study stable and queue its jobs ((route, destination) pairs) in one
        transaction; False if it received an instance meanwhile (or another node took it)."""
        def work() -> bool:
            db = database.obj
            p = db.param
            cur = db.execute_sql(
                f"DELETE FROM pacsd_study_activity WHERE study_uid = {p} AND "
                f"last_received < {self._now()} - {p}", (study_uid, quiet_s))
            if cur.rowcount != 1:
                return False
            self.index.enqueue([(r, d, study_uid, "") for r, d in jobs])
            return True
        return bool(self.index.submit(work))

    # --- the admin side ---------------------------------------------------------------------

    def jobs(self, state: str | None = None, limit: int = 200) -> list[Job]:
        with reading():
            db = database.obj
            p, now = db.param, self._now()
            where, params = ("WHERE state = " + p, [state]) if state else ("", [])
            rows = db.execute_sql(
                f"SELECT {_COLUMNS}, next_try - {now}, created FROM pacsd_route_job {where} "
                f"ORDER BY id DESC LIMIT {p}", (*params, limit)).fetchall()
        return [Job(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        with reading():
            rows = database.obj.execute_sql(
                "SELECT state, COUNT(*) FROM pacsd_route_job GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {s: int(n) for s, n in rows}

    def depths(self) -> dict[str, int]:
        """Jobs queued and dead: one range of the (state, next_try) index each, so the cost
        is those jobs, never the finished ones kept for a week (/metrics, at every scrape)."""
        with reading():
            db = database.obj
            return {state: int(db.execute_sql(
                f"SELECT COUNT(*) FROM pacsd_route_job WHERE state = {db.param}",
                (state,)).fetchone()[0]) for state in ("queued", "dead")}

    def retry(self, ids: list[int] | None = None) -> int:
        """Queue these jobs (or every dead one) again, as new: tries from zero, due now."""
        def work() -> int:
            db = database.obj
            p, now = db.param, self._now()
            sql = (f"UPDATE pacsd_route_job SET state = 'queued', attempts = 0, next_try = {now},"
                   f" claimed_by = '', claimed_until = 0, updated = {now} WHERE ")
            if ids is None:
                return db.execute_sql(sql + "state = 'dead'").rowcount
            n = 0
            for job_id in ids:
                n += db.execute_sql(sql + f"id = {p} AND state != 'queued'",
                                    (job_id,)).rowcount
            return n
        return int(self.index.submit(work) or 0)

    def forget(self, ids: list[int]) -> int:
        """Delete jobs that are not queued (done or dead)."""
        def work() -> int:
            p = database.obj.param
            return sum(database.obj.execute_sql(
                f"DELETE FROM pacsd_route_job WHERE id = {p} AND state != 'queued'",
                (i,)).rowcount for i in ids)
        return int(self.index.submit(work) or 0)

    def prune(self, older_than_s: float) -> int:
        """Forget done jobs older than `older_than_s` (housekeeping)."""
        def work() -> int:
            p = database.obj.param
            return database.obj.execute_sql(
                f"DELETE FROM pacsd_route_job WHERE state = 'done' AND updated < "
                f"{self._now()} - {p}", (older_than_s,)).rowcount
        return int(self.index.submit(work) or 0)
