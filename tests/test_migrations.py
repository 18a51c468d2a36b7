"""Schema versions (pacsd.index.migrations) through the real CLI and server: an index written by the
previous pacsd (schema 1, SQLite only) is upgraded by `pacsd migrate` or at start-up and keeps
its rows; `[index] auto_migrate = false` refuses an old index; an index newer than this pacsd
is refused on both backends; two nodes migrating one PostgreSQL database at once create it once.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from conftest import c_find, pacsd_cmd, store_files, write_config
from data import ct_slice

from pacsd import config
from pacsd.index import migrations
from pacsd.daemon.server import Server
from pacsd.errors import EXIT_OK, EXIT_SOFTWARE, IndexUnavailable
from pacsd.imaging.header import check_and_extract
from pacsd.index import Index
from pacsd.index.models import MODELS, database, name_key

# Schema 1 as pacsd 1's peewee models made it (`git show <v1>:pacsd/index.py`: Patient, Study,
# Series, Instance, Meta_ with VARCHAR(n) columns), plus pacsd_node / pacsd_user, which its
# pacsd.accounts made when a server first started. No pacsd_lease.
V1_TABLES = """
CREATE TABLE "patient" (
    "id" INTEGER NOT NULL PRIMARY KEY, "patient_id" VARCHAR(64) NOT NULL,
    "issuer_of_patient_id" VARCHAR(64) NOT NULL, "patient_name" VARCHAR(324) NOT NULL,
    "patient_name_key" VARCHAR(324) NOT NULL, "patient_birth_date" VARCHAR(18) NOT NULL,
    "patient_sex" VARCHAR(16) NOT NULL, "number_of_studies" INTEGER NOT NULL,
    "number_of_series" INTEGER NOT NULL, "number_of_instances" INTEGER NOT NULL);
CREATE INDEX "patient_patient_id" ON "patient" ("patient_id");
CREATE INDEX "patient_issuer_of_patient_id" ON "patient" ("issuer_of_patient_id");
CREATE INDEX "patient_patient_name_key" ON "patient" ("patient_name_key");
CREATE INDEX "patient_patient_birth_date" ON "patient" ("patient_birth_date");
CREATE INDEX "patient_patient_sex" ON "patient" ("patient_sex");
CREATE UNIQUE INDEX "patient_patient_id_issuer_of_patient_id"
    ON "patient" ("patient_id", "issuer_of_patient_id");
CREATE TABLE "study" (
    "id" INTEGER NOT NULL PRIMARY KEY, "patient_id" INTEGER NOT NULL,
    "study_instance_uid" VARCHAR(64) NOT NULL, "study_date" VARCHAR(18) NOT NULL,
    "study_time" VARCHAR(28) NOT NULL, "accession_number" VARCHAR(64) NOT NULL,
    "study_id" VARCHAR(16) NOT NULL, "study_description" VARCHAR(64) NOT NULL,
    "referring_physician_name" VARCHAR(324) NOT NULL,
    "referring_physician_name_key" VARCHAR(324) NOT NULL, "institution_name" VARCHAR(64) NOT NULL,
    "patient_age" VARCHAR(4) NOT NULL, "specific_character_set" VARCHAR(200) NOT NULL,
    "modalities_in_study" VARCHAR(200) NOT NULL, "number_of_series" INTEGER NOT NULL,
    "number_of_instances" INTEGER NOT NULL, "created" DATETIME NOT NULL,
    FOREIGN KEY ("patient_id") REFERENCES "patient" ("id"));
CREATE INDEX "study_patient_id" ON "study" ("patient_id");
CREATE UNIQUE INDEX "study_study_instance_uid" ON "study" ("study_instance_uid");
CREATE INDEX "study_study_date" ON "study" ("study_date");
CREATE INDEX "study_study_time" ON "study" ("study_time");
CREATE INDEX "study_accession_number" ON "study" ("accession_number");
CREATE INDEX "study_study_id" ON "study" ("study_id");
CREATE INDEX "study_study_description" ON "study" ("study_description");
CREATE INDEX "study_referring_physician_name_key" ON "study" ("referring_physician_name_key");
CREATE INDEX "study_institution_name" ON "study" ("institution_name");
CREATE INDEX "study_patient_age" ON "study" ("patient_age");
CREATE INDEX "study_created" ON "study" ("created");
CREATE TABLE "series" (
    "id" INTEGER NOT NULL PRIMARY KEY, "study_id" INTEGER NOT NULL,
    "series_instance_uid" VARCHAR(64) NOT NULL, "modality" VARCHAR(16) NOT NULL,
    "series_number" INTEGER, "series_description" VARCHAR(64) NOT NULL,
    "series_date" VARCHAR(18) NOT NULL, "series_time" VARCHAR(28) NOT NULL,
    "body_part_examined" VARCHAR(16) NOT NULL, "protocol_name" VARCHAR(64) NOT NULL,
    "station_name" VARCHAR(16) NOT NULL, "number_of_instances" INTEGER NOT NULL,
    FOREIGN KEY ("study_id") REFERENCES "study" ("id"));
CREATE INDEX "series_study_id" ON "series" ("study_id");
CREATE UNIQUE INDEX "series_series_instance_uid" ON "series" ("series_instance_uid");
CREATE INDEX "series_modality" ON "series" ("modality");
CREATE INDEX "series_series_number" ON "series" ("series_number");
CREATE INDEX "series_series_description" ON "series" ("series_description");
CREATE INDEX "series_series_date" ON "series" ("series_date");
CREATE INDEX "series_series_time" ON "series" ("series_time");
CREATE INDEX "series_body_part_examined" ON "series" ("body_part_examined");
CREATE INDEX "series_protocol_name" ON "series" ("protocol_name");
CREATE INDEX "series_station_name" ON "series" ("station_name");
CREATE INDEX "series_study_id_modality" ON "series" ("study_id", "modality");
CREATE TABLE "instance" (
    "id" INTEGER NOT NULL PRIMARY KEY, "series_id" INTEGER NOT NULL,
    "sop_instance_uid" VARCHAR(64) NOT NULL, "sop_class_uid" VARCHAR(64) NOT NULL,
    "instance_number" INTEGER, "content_date" VARCHAR(18) NOT NULL,
    "content_time" VARCHAR(28) NOT NULL, "acquisition_number" INTEGER, "number_of_frames" INTEGER,
    "rows" INTEGER, "columns" INTEGER, "transfer_syntax_uid" VARCHAR(64) NOT NULL,
    "path" VARCHAR(255) NOT NULL, "size" INTEGER NOT NULL, "calling_aet" VARCHAR(16) NOT NULL,
    "received" DATETIME NOT NULL, FOREIGN KEY ("series_id") REFERENCES "series" ("id"));
CREATE INDEX "instance_series_id" ON "instance" ("series_id");
CREATE UNIQUE INDEX "instance_sop_instance_uid" ON "instance" ("sop_instance_uid");
CREATE INDEX "instance_sop_class_uid" ON "instance" ("sop_class_uid");
CREATE INDEX "instance_instance_number" ON "instance" ("instance_number");
CREATE INDEX "instance_content_date" ON "instance" ("content_date");
CREATE INDEX "instance_content_time" ON "instance" ("content_time");
CREATE INDEX "instance_acquisition_number" ON "instance" ("acquisition_number");
CREATE UNIQUE INDEX "instance_path" ON "instance" ("path");
CREATE INDEX "instance_received" ON "instance" ("received");
CREATE TABLE "pacsd_meta" ("key" VARCHAR(64) NOT NULL PRIMARY KEY, "value" VARCHAR(255) NOT NULL);
"""
V1_DIRECTORY_TABLES = """
CREATE TABLE "pacsd_node" (
    "name" VARCHAR(64) NOT NULL PRIMARY KEY, "aet" VARCHAR(16) NOT NULL,
    "host" VARCHAR(255) NOT NULL, "port" INTEGER NOT NULL);
CREATE UNIQUE INDEX "pacsd_node_aet" ON "pacsd_node" ("aet");
CREATE TABLE "pacsd_user" (
    "name" VARCHAR(64) NOT NULL PRIMARY KEY, "password_hash" VARCHAR(255) NOT NULL,
    "admin" INTEGER NOT NULL);
"""

SEED = 31
TS = "1.2.840.10008.1.2.1"


def slice_(n: int):
    return ct_slice(seed=SEED, patient=1, study=1, series=1, number=n, size=8)


def write_v1_index(path: Path, served: bool) -> list[str]:
    """A schema-1 index holding instances 1 and 2 of one series (rows as pacsd 1 wrote them)
    and, if a server of pacsd 1 ever ran on it, a node and a user added on its admin page.
    Returns the SOP Instance UIDs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    v = [check_and_extract(slice_(n)).values for n in (1, 2)]
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode = wal")   # as pacsd 1 opened it
        db.executescript(V1_TABLES + (V1_DIRECTORY_TABLES if served else ""))
        with db:
            db.execute("INSERT INTO pacsd_meta VALUES ('schema_version', '1')")
            db.execute("INSERT INTO patient VALUES (1, ?, ?, ?, ?, ?, ?, 1, 1, 2)", (
                v[0]["patient_id"], v[0]["issuer_of_patient_id"], v[0]["patient_name"],
                name_key(v[0]["patient_name"]), v[0]["patient_birth_date"],
                v[0]["patient_sex"]))
            db.execute("INSERT INTO study VALUES (1, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'CT', 1, "
                       "2, '2024-01-02 10:00:00')", (
                           v[0]["study_instance_uid"], v[0]["study_date"], v[0]["study_time"],
                           v[0]["accession_number"], v[0]["study_id"],
                           v[0]["study_description"], v[0]["referring_physician_name"],
                           name_key(v[0]["referring_physician_name"]),
                           v[0]["institution_name"], v[0]["patient_age"],
                           v[0]["specific_character_set"]))
            db.execute("INSERT INTO series VALUES (1, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, 2)", (
                v[0]["series_instance_uid"], v[0]["modality"], v[0]["series_number"],
                v[0]["series_description"], v[0]["series_date"], v[0]["series_time"],
                v[0]["body_part_examined"], v[0]["protocol_name"], v[0]["station_name"]))
            for i, row in enumerate(v, 1):
                db.execute("INSERT INTO instance VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                           "?, 1000, 'OLDSCU', '2024-01-02 10:00:00')", (
                               i, row["sop_instance_uid"], row["sop_class_uid"],
                               row["instance_number"], row["content_date"],
                               row["content_time"], row["acquisition_number"],
                               row["number_of_frames"], row["rows"], row["columns"], TS,
                               f"old/{i}.dcm"))
            if served:
                db.execute("INSERT INTO pacsd_node VALUES ('oldnode', 'OLDAE', '127.0.0.1', "
                           "11112)")
                db.execute("INSERT INTO pacsd_user VALUES ('olduser', 'not-a-real-hash', 1)")
    finally:
        db.close()
    return [row["sop_instance_uid"] for row in v]


def sqlite_schema(path: Path) -> tuple[str, list[str]]:
    """(schema_version, tables) of an SQLite index, read without pacsd."""
    db = sqlite3.connect(path)
    try:
        (value,), = db.execute("SELECT value FROM pacsd_meta WHERE key = 'schema_version'")
        tables = sorted(r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"))
    finally:
        db.close()
    return value, tables


def pacsd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(pacsd_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def start(cfg_file: Path) -> Server:
    return Server(config.load(cfg_file, env={})).start()


@pytest.mark.parametrize("served", [True, False], ids=["served", "imported-only"])
@pytest.mark.parametrize("how", ["pacsd-migrate", "at-start-up"])
def test_a_version_1_index_is_upgraded_and_keeps_its_rows(tmp_path, how, served):
    data = tmp_path / "data"
    uids = write_v1_index(data / "index.sqlite3", served)
    auto = how == "at-start-up"
    cfg = write_config(tmp_path / "pacsd.toml", data, index={"auto_migrate": auto})
    if how == "pacsd-migrate":
        # --status says what is to be done, and does nothing; it exits 0 either way.
        status = pacsd("migrate", "--status", "--config", str(cfg))
        todo = [m for m in migrations.MIGRATIONS if m.version > 1]
        assert status.returncode == EXIT_OK, status.stderr
        assert f"schema 1 (this pacsd: {migrations.LATEST}), {len(todo)} migration(s) to run: " \
            "tables for nodes" in status.stdout, status.stdout
        assert sqlite_schema(data / "index.sqlite3")[0] == "1"   # --status changes nothing
        done = pacsd("migrate", "--config", str(cfg))
        assert done.returncode == EXIT_OK, done.stderr
        assert "schema 2: tables for nodes" in done.stdout, done.stdout
        for args in (("migrate",), ("migrate", "--status")):
            again = pacsd(*args, "--config", str(cfg))
            assert again.returncode == EXIT_OK, again.stderr
            assert f"schema {migrations.LATEST} (this pacsd: {migrations.LATEST}), up to date" \
                in again.stdout, again.stdout
        version, tables = sqlite_schema(data / "index.sqlite3")
        assert version == str(migrations.LATEST)
        assert {"pacsd_lease", "pacsd_node", "pacsd_user"} <= set(tables)
    # A server (refusing an old schema unless it migrates at start-up) finds the old rows,
    # and adds to them.
    server = start(cfg)
    try:
        assert sqlite_schema(data / "index.sqlite3")[0] == str(migrations.LATEST)
        status, studies = c_find(server.dicom_port, "STUDY", PatientID="PID31-001",
                                 StudyInstanceUID="", NumberOfStudyRelatedInstances="",
                                 ModalitiesInStudy="")
        assert status == 0 and len(studies) == 1
        assert studies[0].NumberOfStudyRelatedInstances == 2
        new = tmp_path / "3.dcm"
        slice_(3).save_as(new, enforce_file_format=True)
        assert store_files(server.dicom_port, [new]) == [0]
        _, images = c_find(server.dicom_port, "IMAGE", PatientID="PID31-001",
                           StudyInstanceUID=studies[0].StudyInstanceUID, SOPInstanceUID="")
        assert sorted(i.SOPInstanceUID for i in images) == sorted(
            uids + [str(slice_(3).SOPInstanceUID)])
        _, studies = c_find(server.dicom_port, "STUDY", PatientID="PID31-001",
                            NumberOfStudyRelatedInstances="")
        assert studies[0].NumberOfStudyRelatedInstances == 3
        accounts = server.runtime.accounts
        if served:
            assert accounts.node("oldnode").aet == "OLDAE"
            assert accounts.user("olduser") is not None
        assert server.index.lease("tmp-sweep", 60)   # the new table works
    finally:
        server.stop()


def test_auto_migrate_false_refuses_a_version_1_index(tmp_path):
    data = tmp_path / "data"
    write_v1_index(data / "index.sqlite3", served=True)
    before = (data / "index.sqlite3").read_bytes()
    cfg = write_config(tmp_path / "pacsd.toml", data, index={"auto_migrate": False})
    proc = pacsd("serve", "--config", str(cfg))
    assert proc.returncode == EXIT_SOFTWARE, proc.stderr
    assert f"has schema 1; this pacsd needs {migrations.LATEST}: run `pacsd migrate`" in \
        proc.stderr, proc.stderr
    assert sqlite_schema(data / "index.sqlite3") == ("1", [
        "instance", "pacsd_meta", "pacsd_node", "pacsd_user", "patient", "series", "study"])
    assert (data / "index.sqlite3").read_bytes() == before
    assert not (data / "pacsd.json").exists()


def test_auto_migrate_false_still_creates_an_empty_index(index_url):
    index = Index(index_url, auto_migrate=False).open(writer=False)
    try:
        assert index.counts()["instances"] == 0
        with database.connection_context():
            assert migrations.version(database.obj) == migrations.LATEST
    finally:
        index.close()


def set_schema_version(url: str, version: int) -> None:
    sql = f"UPDATE pacsd_meta SET value = '{version}' WHERE key = 'schema_version'"
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url[len("sqlite:///"):])
        with db:
            assert db.execute(sql).rowcount == 1
        db.close()
    else:
        with psycopg.connect(url, connect_timeout=10) as conn:
            assert conn.execute(sql).rowcount == 1


def schema_version(url: str) -> int:
    sql = "SELECT value FROM pacsd_meta WHERE key = 'schema_version'"
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url[len("sqlite:///"):])
        try:
            return int(db.execute(sql).fetchone()[0])
        finally:
            db.close()
    with psycopg.connect(url, connect_timeout=10) as conn:
        return int(conn.execute(sql).fetchone()[0])


def test_an_index_newer_than_this_pacsd_is_refused(index_url, tmp_path):
    Index(index_url).open(writer=False).close()
    newer = migrations.LATEST + 1
    set_schema_version(index_url, newer)
    message = f"has schema {newer}, newer than this pacsd ({migrations.LATEST}); upgrade pacsd"
    with pytest.raises(IndexUnavailable, match=r"upgrade pacsd"):
        Index(index_url).open()
    cfg = write_config(tmp_path / "pacsd.toml", tmp_path / "data", index={"url": index_url})
    for args in (("serve",), ("migrate",), ("migrate", "--status")):
        proc = pacsd(*args, "--config", str(cfg))
        assert (proc.returncode, message in proc.stderr) == (EXIT_SOFTWARE, True), \
            (args, proc.stdout, proc.stderr)
    assert schema_version(index_url) == newer   # never touched


def test_two_nodes_migrating_one_empty_database_at_once(postgres_url, tmp_path):
    # Both `pacsd migrate` processes find the database empty and go for the migration lock;
    # we hold it until both wait for it, so that they really meet there.
    cfg = write_config(tmp_path / "pacsd.toml", tmp_path / "data", index={"url": postgres_url})
    status = pacsd("migrate", "--status", "--config", str(cfg))
    assert status.returncode == EXIT_OK, status.stderr
    assert f"schema none (this pacsd: {migrations.LATEST}), 1 migration(s) to run: create the " \
        "tables" in status.stdout, status.stdout
    with psycopg.connect(postgres_url, autocommit=True, connect_timeout=10) as lock:
        assert lock.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone()[0] == 0   # --status created nothing
        lock.execute("SELECT pg_advisory_lock(%s)", (migrations._LOCK_KEY,))
        procs = [subprocess.Popen(pacsd_cmd("migrate", "--config", str(cfg)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL) for _ in range(2)]
        try:
            deadline = time.monotonic() + 30
            waiting = 0
            while waiting < 2:
                assert time.monotonic() < deadline, "the migrations never waited for the lock"
                assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
                time.sleep(0.02)
                waiting = lock.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND wait_event = 'advisory'").fetchone()[0]
            lock.execute("SELECT pg_advisory_unlock(%s)", (migrations._LOCK_KEY,))
            outputs = [p.communicate(timeout=60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        tables = {r[0] for r in lock.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        meta = lock.execute("SELECT key, value FROM pacsd_meta").fetchall()
    assert [p.returncode for p in procs] == [0, 0], outputs
    created = [out for out, _ in outputs if "created the tables" in out]
    assert len(created) == 1, outputs
    assert f"(schema {migrations.LATEST})" in created[0]
    assert meta == [("schema_version", str(migrations.LATEST))]
    assert tables == {m._meta.table_name for m in MODELS}


def run_sql(url: str, *statements: str) -> None:
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url[len("sqlite:///"):])
        with db:
            for sql in statements:
                db.execute(sql)
        db.close()
    else:
        with psycopg.connect(url, connect_timeout=10) as conn:
            for sql in statements:
                conn.execute(sql)


def archived(index_url: str, folder: Path, files: list[Path]):
    """The files stored into a Store at `folder` and the index at `index_url` (closed again);
    the Store."""
    from pacsd.storage.archive import Archive
    from pacsd.storage.store import Store
    store = Store(folder)
    store.open()
    index = Index(index_url).open()
    try:
        for f in files:
            Archive(store, index).put_file(f)
    finally:
        index.close()
    return store


def test_schema_3_gains_content_hashes_when_instances_come_again(index_url, tmp_path):
    """Schema 4 adds instance.content_hash (NULL for what was stored before) and the conflicts
    table; a re-sent old instance is hashed then: the same content is a duplicate, other
    content a conflict that storage commitment will not vouch for."""
    from pacsd.errors import ContentConflict
    from pacsd.storage.archive import Archive

    files = []
    for n in (1, 2):
        ds = ct_slice(seed=71, patient=1, study=1, series=1, number=n, size=16)
        files.append(tmp_path / f"{n}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    ds.PixelData = bytes(len(ds.PixelData))
    other = tmp_path / "2-other.dcm"
    ds.save_as(other, enforce_file_format=True)
    store = archived(index_url, tmp_path / "storage", files)
    # As schema 3 left it: no hash column, no conflicts table.
    run_sql(index_url, "DROP TABLE pacsd_conflict",
            "ALTER TABLE instance DROP COLUMN content_hash")
    set_schema_version(index_url, 3)

    index = Index(index_url).open()
    try:
        assert schema_version(index_url) == migrations.LATEST >= 6
        archive = Archive(store, index)
        with index.reading():
            hashes = dict(database.obj.execute_sql(
                "SELECT sop_instance_uid, content_hash FROM instance").fetchall())
        assert list(hashes.values()) == [None, None]
        assert archive.put_file(files[0]).duplicate   # the same bytes: hashed now, equal
        with pytest.raises(ContentConflict):
            archive.put_file(other)
        sop2 = str(ds.SOPInstanceUID)
        assert index.conflicted([*hashes]) == {sop2}
        with index.reading():
            hashes = dict(database.obj.execute_sql(
                "SELECT sop_instance_uid, content_hash FROM instance").fetchall())
        assert None not in hashes.values() and len(set(hashes.values())) == 2
        assert index.counts()["instances"] == 2
        # Deleting the instance resolves the conflict (its copy aside stays on disk).
        archive.delete("IMAGE", [sop2])
        assert index.conflicted([sop2]) == set()
        assert len(list((tmp_path / "storage" / ".conflicts").rglob("*.dcm"))) == 1
    finally:
        index.close()


def test_schema_7_gains_totals_counted_from_its_rows(index_url, tmp_path):
    """Schema 8 keeps the index's totals in one row (what /status reads): made by counting the
    rows once, then kept by the writer."""
    from data import write_series
    from pydicom import dcmread

    from pacsd.storage.archive import Archive

    files = write_series(tmp_path / "in", seed=72, patients=2, studies=1, series=2, images=3,
                         size=8)
    store = archived(index_url, tmp_path / "storage", files)
    size = sum(p.stat().st_size for p in (tmp_path / "storage").rglob("*.dcm"))
    run_sql(index_url, "DROP TABLE pacsd_totals")   # as schema 7 left it
    set_schema_version(index_url, 7)

    index = Index(index_url).open()
    try:
        assert schema_version(index_url) == migrations.LATEST >= 8
        assert index.counts() == dict(patients=2, studies=2, series=4, instances=12, bytes=size)
        Archive(store, index).delete("SERIES", [str(dcmread(files[0]).SeriesInstanceUID)])
        # The deleted series went to the recycle bin (STORAGE/.trash), out of the totals.
        left = sum(p.stat().st_size for p in (tmp_path / "storage").rglob("*.dcm")
                   if ".trash" not in p.parts)
        assert 0 < left < size
        assert index.counts() == dict(patients=2, studies=2, series=3, instances=9, bytes=left)
    finally:
        index.close()


def test_schema_5_nodes_gain_a_wado_url(index_url, tmp_path):
    """Schema 6 adds pacsd_node.wado_url (NULL: no WADO address) and keeps every node."""
    from pacsd.accounts import Accounts
    index = Index(index_url).open()
    index.close()
    # As schema 5 left it: a node added on the admin page, no wado_url column.
    run_sql(index_url, "ALTER TABLE pacsd_node DROP COLUMN wado_url",
            "INSERT INTO pacsd_node (name, aet, host, port, allow_find, allow_get, allow_move, "
            "allow_store) VALUES ('ws', 'WS', '127.0.0.1', 104, TRUE, FALSE, TRUE, TRUE)")
    set_schema_version(index_url, 5)

    index = Index(index_url).open()
    try:
        assert schema_version(index_url) == migrations.LATEST >= 6
        cfg = config.load(None, env={"PACSD_DATA": str(tmp_path / "d")})
        accounts = Accounts(cfg, index).open()
        node = accounts.node("ws")
        assert (node.aet, node.port, node.allow_get, node.wado_url) == ("WS", 104, False, "")
        changed = accounts.save_node({"name": "ws", "aet": "WS", "host": "127.0.0.1",
                                      "port": 104, "wado_url": "http://127.0.0.1:8080/wado"},
                                     replacing="ws")
        assert (changed.allow_get, changed.wado_url) == (False, "http://127.0.0.1:8080/wado")
        assert accounts._reload() and accounts.node("ws") == changed
    finally:
        index.close()
