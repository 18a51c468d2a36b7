"""Versioned schema changes, for both backends (`pacsd migrate`, or at start-up).

The schema's version is kept in the index itself (pacsd_meta.schema_version). An empty database
gets today's tables in one step; an older one runs each later migration in turn. It all happens
in one transaction (both engines roll DDL back), under a lock that several nodes starting at once
respect: PostgreSQL's advisory lock, SQLite's write lock. A database newer than this pacsd is
never touched: that pacsd refuses to start and says to upgrade.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from peewee import Database, SqliteDatabase

from pacsd.compat import peewee as peewee_meta
from pacsd.errors import IndexUnavailable
from pacsd.index import counters
from pacsd.index.models import (
    MODELS,
    Conflict,
    Lease,
    Binned,
    Change,
    Damage,
    Label,
    Meta_,
    NodeRow,
    Patient,
    PerformedStep,
    RouteJob,
    ScheduledStep,
    Share,
    Study,
    StudyActivity,
    Totals,
    UserRow,
    search_key,
)

log = logging.getLogger(__name__)

# (model, column): the search keys of schema 7, and the column each is made from.
_SEARCH_COLUMNS = ((Patient, "patient_name_search"), (Study, "study_description_search"))
_SOURCE = {"patient_name_search": ("patient_name", True),
           "study_description_search": ("study_description", False)}
FILL_BATCH = 2000

_LOCK_KEY = 0x70616373   # "pacs": the advisory lock every pacsd node takes to migrate


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    apply: Callable[[Database], None]


def _v2(db: Database) -> None:
    # Version 1 (SQLite only) made the admin page's tables when first used; make them here.
    db.create_tables([NodeRow, UserRow, Lease], safe=True)


def _v3(db: Database) -> None:
    db.create_tables([RouteJob, StudyActivity], safe=True)


def _v4(db: Database) -> None:
    # A plain nullable column: no table rewrite on either engine, whatever the index's size.
    # Rows of older instances stay NULL until one of them is sent again (pacsd.storage.archive).
    db.execute_sql("ALTER TABLE instance ADD COLUMN content_hash TEXT")
    db.create_tables([Conflict], safe=True)


def _v5(db: Database) -> None:
    # Columns with a constant default: SQLite and PostgreSQL both add them without rewriting
    # the rows. Existing nodes keep every right they had (all true).
    from playhouse.migrate import SchemaMigrator, migrate
    migrator = SchemaMigrator.from_database(db)
    table = peewee_meta.table_name(NodeRow)
    have = {c.name for c in db.get_columns(table)}
    migrate(*(migrator.add_column(table, name, getattr(NodeRow, name))
              for name in ("allow_find", "allow_get", "allow_move", "allow_store")
              if name not in have))



def _v6(db: Database) -> None:
    # A nullable column: a plain ADD COLUMN on both engines; existing nodes have none (NULL).
    from playhouse.migrate import SchemaMigrator, migrate
    migrator = SchemaMigrator.from_database(db)
    table = peewee_meta.table_name(NodeRow)
    if "wado_url" not in {c.name for c in db.get_columns(table)}:
        migrate(migrator.add_column(table, "wado_url", NodeRow.wado_url))


# Indexes on expressions, which peewee's models do not declare: made with the tables and by
# the migration to schema 7. LOWER(patient_id): the study list's case-insensitive ID prefix.
EXPRESSION_INDEXES = (
    "CREATE INDEX IF NOT EXISTS patient_patient_id_lower ON patient (LOWER(patient_id))",)


def _v7(db: Database) -> None:
    # Nullable columns: a plain ADD COLUMN on both engines, whatever the index's size. The rows
    # are filled afterwards, outside this transaction, in batches (fill_search_keys): the key
    # is Python's Unicode folding, which neither engine has in SQL.
    from playhouse.migrate import SchemaMigrator, migrate
    migrator = SchemaMigrator.from_database(db)
    for model, column in _SEARCH_COLUMNS:
        table = peewee_meta.table_name(model)
        if column not in {c.name for c in db.get_columns(table)}:
            # With its index: peewee's add_column makes one for a field declared index=True.
            migrate(migrator.add_column(table, column, getattr(model, column)))
    for sql in EXPRESSION_INDEXES:
        db.execute_sql(sql)


def _v8(db: Database) -> None:
    # One count of every row, once (minutes at ten million instances, under the migration's
    # lock); from then on the writer keeps the row in step with the rows it adds and removes.
    db.create_tables([Totals], safe=True)
    counters.recount(db)


def _v9(db: Database) -> None:
    db.create_tables([Change, Binned, Damage], safe=True)


def _v10(db: Database) -> None:
    db.create_tables([Label, Share], safe=True)
    # [[groups]] calling_aet scopes find the studies of a caller through it.
    db.execute_sql("CREATE INDEX IF NOT EXISTS instance_calling_aet ON instance (calling_aet)")


def _v11(db: Database) -> None:
    db.create_tables([ScheduledStep, PerformedStep], safe=True)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "tables for nodes and users added on the admin page, and leases for the jobs "
                 "that one node runs alone", _v2),
    Migration(3, "the routing queue, and when each study last received an instance", _v3),
    Migration(4, "a content hash per instance, and the copies that came with other content",
              _v4),
    Migration(5, "what each node added on the admin page may ask of us (find, get, move, "
                 "store)", _v5),
    Migration(6, "a WADO-URI address for each node added on the admin page", _v6),
    Migration(7, "search keys for patient names and study descriptions (case and accents "
                 "ignored), for the study list", _v7),
    Migration(8, "the index's totals in one row (what /status shows, without counting rows)",
              _v8),
    Migration(9, "a recycle bin for deleted studies, series and instances, the history of "
                 "what was done by hand, and the stored files found damaged", _v9),
    Migration(10, "labels on studies (who may see them) and links that share one study", _v10),
    Migration(11, "the Modality Worklist (scheduled procedure steps) and the performed steps "
                  "modalities report (MPPS)", _v11),
)
LATEST = max(m.version for m in MIGRATIONS)


def version(db: Database) -> int:
    """The schema version of the open database; 0 for an empty one."""
    if not db.table_exists(peewee_meta.table_name(Meta_)):
        return 0
    with db.bind_ctx([Meta_]):   # `db`, whatever the models' proxy is bound to
        row = Meta_.get_or_none(Meta_.key == "schema_version")
    return int(row.value) if row is not None else 0


def pending(db: Database) -> list[Migration]:
    v = version(db)
    if v == 0:
        return [Migration(LATEST, "create the tables", lambda db: None)]
    return [m for m in MIGRATIONS if m.version > v]


def _set_version(v: int) -> None:
    Meta_.insert(key="schema_version", value=str(v)).on_conflict(
        conflict_target=[Meta_.key], update={Meta_.value: str(v)}).execute()


def check(db: Database, label: str) -> None:
    """IndexUnavailable if this pacsd cannot use the database's schema as it is."""
    v = version(db)
    if v > LATEST:
        raise IndexUnavailable(f"index {label} has schema {v}, newer than this pacsd "
                               f"({LATEST}); upgrade pacsd")
    if 0 < v < LATEST:
        raise IndexUnavailable(f"index {label} has schema {v}; this pacsd needs {LATEST}: run "
                               "`pacsd migrate` (or set [index] auto_migrate = true)")


def upgrade(db: Database, label: str) -> list[str]:
    """Bring the schema to LATEST, then fill any search key still missing
    (fill_search_keys); what was done, in words (nothing when it was up to date)."""
    done = _upgrade_schema(db, label)
    filled = fill_search_keys(db, label)
    if filled:
        done.append(f"search keys filled for {filled} row(s)")
    return done


def _upgrade_schema(db: Database, label: str) -> list[str]:
    atomic = db.atomic("IMMEDIATE") if isinstance(db, SqliteDatabase) else db.atomic()
    with atomic, db.bind_ctx(MODELS):
        if not isinstance(db, SqliteDatabase):
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        v = version(db)   # read under the lock: another node may have just done it
        if v > LATEST:
            check(db, label)   # refuses: newer than this pacsd
        if v == LATEST:
            return []
        if v == 0:
            db.create_tables(MODELS)
            for sql in EXPRESSION_INDEXES:
                db.execute_sql(sql)
            counters.recount(db)
            _set_version(LATEST)
            log.info("index %s: created the tables (schema %d)", label, LATEST)
            return [f"created the tables (schema {LATEST})"]
        done = []
        for m in MIGRATIONS:
            if m.version > v:
                m.apply(db)
                _set_version(m.version)
                log.info("index %s: schema %d: %s", label, m.version, m.what)
                done.append(f"schema {m.version}: {m.what}")
        return done


def fill_search_keys(db: Database, label: str, batch: int | None = None) -> int:
    """Fill the search keys (schema 7) of the rows that have none yet; how many were filled.

    Batches of `batch` rows (found on the key's index: no ORDER BY, which would scan the
    table on every start once all is filled), each its own transaction: a large index is not held
    in one transaction for minutes, and a fill that is stopped (a restart, a crash) resumes
    where it was on the next start or `pacsd migrate`, since a row without its key is NULL
    and the writer fills the key of every new row. Several nodes filling at once only write
    the same values twice. Costs one indexed look-up per column when all is done."""
    total, batch = 0, batch or FILL_BATCH
    p = db.param
    for model, column in _SEARCH_COLUMNS:
        table = peewee_meta.table_name(model)
        source, name = _SOURCE[column]
        missing = f"SELECT id, {source} FROM {table} WHERE {column} IS NULL LIMIT {p}"
        if db.execute_sql(missing, (1,)).fetchone() is None:
            continue
        remaining = db.execute_sql(
            f"SELECT COUNT(*) FROM {table} WHERE {column} IS NULL").fetchone()[0]
        log.info("index %s: filling the search key of %d %s row(s)", label, remaining, table)
        done, last_log = 0, time.monotonic()
        while True:
            with db.atomic():
                rows = db.execute_sql(missing, (batch,)).fetchall()
                if not rows:
                    break
                db.execute_sql(f"UPDATE {table} SET {column} = CASE id "
                               + " ".join(f"WHEN {p} THEN {p}" for _ in rows)
                               + f" END WHERE id IN ({', '.join([p] * len(rows))})",
                               [x for i, v in rows for x in (i, search_key(v or "", name))]
                               + [i for i, _ in rows])
            done += len(rows)
            if time.monotonic() - last_log > 5:
                log.info("index %s: %s search keys: %d of %d filled", label, table, done,
                         remaining)
                last_log = time.monotonic()
        log.info("index %s: the search key of %d %s row(s) filled", label, done, table)
        total += done
    return total
