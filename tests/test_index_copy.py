"""`pacsd index copy`: a SQLite index made by a real server (C-STORE, admin-page node and user)
copied by the real command into a real PostgreSQL, then served from it: the same studies, the
same bytes, fresh ids for new images. Resuming after an interruption, refusing a target that
holds another archive, and the way back to SQLite."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
from conftest import c_find, c_get, pacsd_cmd, store_files, write_config
from data import ct_slice, dataset_bytes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pacsd import config as config_mod
from pacsd.daemon.server import Server
from pacsd.errors import EXIT_TEMPFAIL
from pacsd.web.auth import hash_password

DICOM_TABLES = ("patient", "study", "series", "instance")
TABLES = (*DICOM_TABLES, "pacsd_meta", "pacsd_node", "pacsd_user")
# (patient, study, series) x 10 images: 3 patients, 4 studies, 6 series, 60 instances.
LAYOUT = ((1, 1, 1), (1, 1, 2), (1, 2, 1), (2, 1, 1), (2, 1, 2), (3, 1, 1))


def write_files(folder: Path, seed: int, layout=LAYOUT, images: int = 10) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, st, se in layout:
        for n in range(1, images + 1):
            path = folder / f"s{seed}p{p}s{st}r{se}i{n:02d}.dcm"
            ct_slice(seed=seed, patient=p, study=st, series=se, number=n, size=16).save_as(
                path, enforce_file_format=True)
            paths.append(path)
    return paths


def studies(port: int) -> set[tuple[str, str, str]]:
    status, found = c_find(port, "STUDY", StudyInstanceUID="", PatientID="",
                           NumberOfStudyRelatedInstances="")
    assert status == 0
    return {(str(m.StudyInstanceUID), str(m.PatientID), str(m.NumberOfStudyRelatedInstances))
            for m in found}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> SimpleNamespace:
    """A stopped pacsd's data folder (SQLite index and storage) filled by a real server: 60
    instances stored with C-STORE, a node and a user added as the admin page adds them."""
    base = tmp_path_factory.mktemp("archive")
    files = write_files(base / "files", seed=71)
    data = base / "pacsd"
    server = Server(config_mod.load(write_config(base / "pacsd.toml", data), env={})).start()
    try:
        assert store_files(server.dicom_port, files) == [0] * len(files)
        assert server.runtime is not None and server.index is not None
        server.runtime.accounts.save_node({"name": "viewer", "aet": "VIEWER",
                                            "host": "127.0.0.1", "port": 11112})
        server.runtime.accounts.save_user("alice", password_hash=hash_password("a password"),
                                           admin=True, new=True)
        counts = server.index.counts()
        found = studies(server.dicom_port)
    finally:
        server.stop()
    assert counts["instances"] == 60 and counts["studies"] == 4 and len(found) == 4
    return SimpleNamespace(data=data, files=files, counts=counts, studies=found)


def data_folder(archive: SimpleNamespace, tmp_path: Path) -> tuple[Path, Path]:
    """This test's own copy of the archive's data folder, and a config file for it."""
    data = tmp_path / "pacsd"
    shutil.copytree(archive.data, data)
    return data, write_config(tmp_path / "pacsd.toml", data)


def copy_index(config: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(pacsd_cmd("index", "copy", "--config", str(config), "--to", url,
                                    *extra), capture_output=True, text=True, timeout=120,
                          check=False)


def _plain(value):
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else value


def pg_rows(url: str) -> dict[str, list[tuple]]:
    """Every row of every pacsd table there is in a PostgreSQL database, by table."""
    with psycopg.connect(url, connect_timeout=10) as conn:
        present = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        return {t: [tuple(_plain(v) for v in row) for row in conn.execute(
                    f"SELECT * FROM {t} ORDER BY 1")]
                for t in TABLES if t in present}


def sqlite_rows(path: Path) -> dict[str, list[tuple]]:
    con = sqlite3.connect(path)
    try:
        return {t: [tuple(row) for row in con.execute(f"SELECT * FROM {t} ORDER BY 1")]
                for t in TABLES}
    finally:
        con.close()


def copied(rows: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    """What a copy carries: not the schema version nor the health marks, booleans as such."""
    out = {t: list(r) for t, r in rows.items() if t != "pacsd_meta"}
    out["pacsd_meta"] = [r for r in rows["pacsd_meta"]
                         if r[0] != "schema_version" and not r[0].startswith("alive:")]
    out["pacsd_user"] = [(n, h, bool(a)) for n, h, a in rows["pacsd_user"]]
    return out


def test_copy_to_postgresql_then_serve_from_it(postgres_url, archive, tmp_path, make_server):
    data, config = data_folder(archive, tmp_path)

    # Refused while the source pacsd runs (rows it stored meanwhile would be missed).
    running = make_server(data=data)
    busy = copy_index(config, postgres_url)
    running.stop()
    assert busy.returncode == EXIT_TEMPFAIL, busy.stderr
    assert "another pacsd" in busy.stderr
    assert pg_rows(postgres_url) == {}, "nothing may be written"

    done = copy_index(config, postgres_url, "--batch", "7")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f'url = "{postgres_url}"' in done.stdout
    assert "DIFFERENT" not in done.stdout
    assert "instance" in done.stderr and "rows/s" in done.stderr   # the progress bars
    source = copied(sqlite_rows(data / "index.sqlite3"))
    assert copied(pg_rows(postgres_url)) == source   # every row, with its id

    # A pacsd on the copy, with the same storage folder, answers as the old one did.
    server = make_server(data=data, index={"url": postgres_url})
    assert server.index.counts() == archive.counts
    assert studies(server.dicom_port) == archive.studies
    assert server.runtime.accounts.node("viewer").aet == "VIEWER"
    assert "alice" in server.runtime.accounts.logins()
    study_uid = str(ct_slice(seed=71, patient=1, study=2, series=1, number=1,
                             size=16).StudyInstanceUID)
    status, got = c_get(server.dicom_port, {"QueryRetrieveLevel": "STUDY",
                                            "StudyInstanceUID": study_uid},
                        CTImageStorage, ExplicitVRLittleEndian)
    assert status == 0 and len(got) == 10
    expected = {str(ct_slice(seed=71, patient=1, study=2, series=1, number=n,
                             size=16).SOPInstanceUID): dataset_bytes(path)
                for n, path in enumerate(archive.files[20:30], 1)}
    assert got == expected

    # New images get new ids: the sequences were set past the copied rows.
    new = write_files(tmp_path / "new", seed=72, layout=((9, 1, 1),), images=2)
    more = tmp_path / "more.dcm"
    ct_slice(seed=71, patient=1, study=1, series=1, number=11, size=16).save_as(
        more, enforce_file_format=True)
    assert store_files(server.dicom_port, [*new, more]) == [0, 0, 0]
    after = server.index.counts()
    assert after["instances"] == 63 and after["patients"] == 4 and after["studies"] == 5
    highest = {t: max(r[0] for r in source[t]) for t in DICOM_TABLES}
    with psycopg.connect(postgres_url) as conn:
        for table, n in (("instance", 3), ("patient", 1), ("study", 1), ("series", 1)):
            ids = [r[0] for r in conn.execute(f"SELECT id FROM {table} WHERE id > %s",
                                              (highest[table],))]
            assert len(ids) == n, table


def enlarge(index: Path, n: int) -> None:
    """Add n instance rows to the first series of a stopped pacsd's SQLite index (as copies of
    its first instance under new UIDs and paths), counters and totals included: enough rows that a copy
    in small batches takes a while."""
    con = sqlite3.connect(index)
    try:
        cols = [r[1] for r in con.execute("PRAGMA table_info(instance)") if r[1] != "id"]
        first = dict(zip(cols, con.execute(f"SELECT {', '.join(cols)} FROM instance "
                                           "ORDER BY id LIMIT 1").fetchone()))
        rows = [tuple({**first, "sop_instance_uid": f"{first['sop_instance_uid']}.{i}",
                       "path": f"{first['path']}.{i}"}[c] for c in cols) for i in range(n)]
        with con:
            con.executemany(f"INSERT INTO instance ({', '.join(cols)}) VALUES "
                            f"({', '.join('?' * len(cols))})", rows)
            series = first["series_id"]
            study, patient = con.execute("SELECT study.id, study.patient_id FROM series JOIN "
                                         "study ON study.id = series.study_id WHERE series.id = ?",
                                         (series,)).fetchone()
            for table, row in (("series", series), ("study", study), ("patient", patient)):
                con.execute(f"UPDATE {table} SET number_of_instances = number_of_instances + ? "
                            "WHERE id = ?", (n, row))
            con.execute("UPDATE pacsd_totals SET instances = instances + ?, bytes = bytes + ? "
                        "WHERE id = 1", (n, n * first["size"]))
    finally:
        con.close()


def test_a_killed_copy_resumes_and_copies_back(archive, tmp_path, postgres_url):
    data, config = data_folder(archive, tmp_path)
    enlarge(data / "index.sqlite3", 20_000)
    source = copied(sqlite_rows(data / "index.sqlite3"))
    total = len(source["instance"])

    # Killed (SIGKILL: no clean-up at all) once its first batches of instances are committed.
    proc = subprocess.Popen(pacsd_cmd("index", "copy", "--config", str(config), "--to",
                                      postgres_url, "--batch", "100"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen, deadline = 0, time.monotonic() + 60
        while seen == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
            try:
                with psycopg.connect(postgres_url, connect_timeout=5) as conn:
                    seen = conn.execute("SELECT COUNT(*) FROM instance").fetchone()[0]
            except psycopg.errors.UndefinedTable:
                continue   # not created yet
        assert proc.poll() is None, "the copy ended before it could be interrupted"
        assert seen > 0, "no batch committed within 60 s"
    finally:
        proc.kill()
        proc.wait(30)
    with psycopg.connect(postgres_url) as conn:
        left = conn.execute("SELECT COUNT(*), MAX(id) FROM instance").fetchone()
    assert 0 < left[0] < total and left[0] % 100 == 0, left   # whole batches only

    again = copy_index(config, postgres_url, "--batch", "100")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{left[0]:,} there already" in again.stdout
    assert "DIFFERENT" not in again.stdout
    assert copied(pg_rows(postgres_url)) == source   # complete, nothing twice

    # And back: PostgreSQL to SQLite gives the very rows the server wrote.
    back = tmp_path / "back" / "index.sqlite3"
    pg_config = write_config(tmp_path / "pg.toml", tmp_path / "pg-node",
                             index={"url": postgres_url})
    returned = copy_index(pg_config, f"sqlite:///{back}")
    assert returned.returncode == 0, returned.stdout + returned.stderr
    assert copied(sqlite_rows(back)) == source


def test_a_target_holding_another_archive_is_refused(archive, tmp_path, make_server,
                                                     make_postgres_url):
    _, config = data_folder(archive, tmp_path)
    other = make_postgres_url()
    server = make_server(data=tmp_path / "other", index={"url": other})
    files = write_files(tmp_path / "other-files", seed=99, layout=((1, 1, 1),), images=3)
    assert store_files(server.dicom_port, files) == [0, 0, 0]
    server.stop()
    before = pg_rows(other)
    refused = copy_index(config, other)
    assert refused.returncode != 0
    assert "already holds other data" in refused.stderr and "patient row 1" in refused.stderr
    assert "Nothing was written" in refused.stderr
    assert pg_rows(other) == before

    # A complete copy that a pacsd then stored into is not "an interrupted copy" either.
    target = make_postgres_url()
    assert copy_index(config, target).returncode == 0
    with psycopg.connect(target) as conn:
        conn.execute("INSERT INTO instance SELECT id + 1000, series_id, sop_instance_uid || '.1',"
                     " sop_class_uid, instance_number, content_date, content_time,"
                     " acquisition_number, number_of_frames, rows, columns,"
                     " transfer_syntax_uid, path || '.1', size, calling_aet, received"
                     " FROM instance WHERE id = 1")
    before = pg_rows(target)
    refused = copy_index(config, target)
    assert refused.returncode != 0
    assert "instance row 1001" in refused.stderr and "no such row" in refused.stderr
    assert pg_rows(target) == before
