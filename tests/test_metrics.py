"""/metrics scraped as Prometheus would, and parsed by Prometheus' own Python parser
(prometheus_client.parser): the counters move by what real clients did (DCMTK's storescu and
echoscu, pynetdicom), a refused C-STORE is counted under the status it got, and only this
machine and administrators may read it."""

from __future__ import annotations

import json
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from pydicom.uid import ExplicitVRLittleEndian

from conftest import LOCAL, associate, dcmtk, run_peer, wait_for
from data import ct_slice, write_series
from pacsd.web.auth import hash_password
from pacsd_watchdog import kill as watchdog_kill

BOSS = {"name": "boss", "password_hash": hash_password("boss-password"), "admin": True}
READER = {"name": "reader", "password_hash": hash_password("reader-password")}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def scrape(url: str, **kw) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed: {(sample name, sorted labels): value}."""
    r = requests.get(f"{url}/metrics", timeout=10, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == CONTENT_TYPE
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counters_move_by_what_real_clients_did(make_server, tmp_path):
    server = make_server(users=[BOSS, READER],
                         dicom={"allowed_calling_aets": ["STORESCU", "ECHOSCU", "PYNETDICOM"]})
    url, port = server.http_url, server.dicom_port
    before = scrape(url)   # loopback, no credentials
    assert value(before, "pacsd_up") == 1
    assert ("pacsd_last_stored_timestamp_seconds", ()) not in before   # nothing stored yet

    paths = write_series(tmp_path / "images", images=3, size=16)
    t0 = time.time()
    run_peer([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PACSD", LOCAL, str(port),
              *map(str, paths)])
    run_peer([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "PACSD", LOCAL, str(port)])
    # A C-STORE the server refuses: a SOP Instance UID that is no UID (0xC000).
    bad = ct_slice(seed=9, patient=2, study=1, series=1, number=1, size=8)
    bad.SOPInstanceUID = "1.2.abc"
    with associate(port, [build_context(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        assert assoc.send_c_store(bad).Status == 0xC000
    # An association refused: a calling AE title not in allowed_calling_aets.
    refused = run_peer([dcmtk("echoscu"), "-aet", "STRANGER", "-aec", "PACSD", LOCAL,
                        str(port)], check=False)
    assert refused.returncode != 0

    wait_for(lambda: value(scrape(url), "pacsd_dicom_associations") == 0, 10,
             "the associations to end")
    after = scrape(url)
    assert moved(before, after, "pacsd_dicom_stores_total", status="0x0000",
                 result="success") == 3
    assert moved(before, after, "pacsd_dicom_stores_total", status="0xC000",
                 result="failure") == 1
    assert moved(before, after, "pacsd_dicom_requests_total", operation="C-STORE") == 4
    assert moved(before, after, "pacsd_dicom_requests_total", operation="C-ECHO") == 1
    assert moved(before, after, "pacsd_dicom_requests_total", operation="C-FIND") == 0
    assert moved(before, after, "pacsd_dicom_associations_accepted_total") == 3
    assert moved(before, after, "pacsd_dicom_associations_rejected_total",
                 reason="refused") == 1
    assert moved(before, after, "pacsd_dicom_associations_rejected_total", reason="limit") == 0
    # The index writer committed the three rows (group commit: one to three batches).
    commits = moved(before, after, "pacsd_index_commit_seconds_count")
    assert commits >= 1
    assert moved(before, after, "pacsd_index_commit_seconds_bucket", le="+Inf") == commits
    assert 0 < moved(before, after, "pacsd_index_commit_seconds_sum") < 30
    assert value(after, "pacsd_index_write_queue") == 0
    # Whole seconds, local time, as the index keeps it.
    assert t0 - 2 <= value(after, "pacsd_last_stored_timestamp_seconds") <= time.time() + 1
    free, size = value(after, "pacsd_storage_free_bytes"), value(after, "pacsd_storage_size_bytes")
    assert 0 < free <= size
    assert {value(after, "pacsd_route_jobs", state=s) for s in ("queued", "dead")} == {0}
    assert value(after, "pacsd_storage_commitments_pending") == 0
    assert value(after, "pacsd_watchdog_kills_total") == 0
    assert value(after, "pacsd_index_readable") == 1


def test_watchdog_counts_are_read_from_its_file(server):
    """What the watchdog records in the data folder (pacsd_watchdog.kill.count) shows here; a
    damaged file counts nothing and spoils nothing."""
    path = server.cfg.watchdog_counts
    path.write_text("{not json")
    assert value(scrape(server.http_url), "pacsd_watchdog_kills_total") == 0
    path.unlink()
    watchdog_kill.count(path, "kill", now=1_700_000_000.0)
    watchdog_kill.count(path, "kill", now=1_700_000_100.0)
    watchdog_kill.count(path, "refused")
    assert json.loads(path.read_text())["kill"] == 2
    samples = scrape(server.http_url)
    assert value(samples, "pacsd_watchdog_kills_total") == 2
    assert value(samples, "pacsd_watchdog_refusals_total") == 1
    assert value(samples, "pacsd_watchdog_alerts_total") == 0
    assert value(samples, "pacsd_watchdog_last_kill_timestamp_seconds") == 1_700_000_100.0


@pytest.mark.parametrize("status", [0x0000, 0x0001, 0x0107, 0xB000, 0xA700, 0xC000, 0x0124])
def test_status_classes(status):
    from pacsd.dicom_status import status_class
    expected = {0x0000: "success", 0x0001: "warning", 0x0107: "warning", 0xB000: "warning"}
    assert status_class(status) == expected.get(status, "failure")


def test_exposition_escapes_what_the_parser_unescapes():
    from pacsd.web.metrics import Exposition
    out = Exposition()
    odd = 'a "quoted" back\\slash\nand a new line'
    out.family("pacsd_test_total", "counter", "help with a \\ backslash\nand a line",
               [({"label": odd}, 3), ({"label": "plain"}, 1.5)])
    (family,) = text_string_to_metric_families(out.text())
    assert family.documentation == "help with a \\ backslash\nand a line"
    assert [(s.labels["label"], s.value) for s in family.samples] == [(odd, 3), ("plain", 1.5)]


def test_route_jobs_by_state(make_server, tmp_path):
    """A route to a destination where nothing listens, one try allowed: the three jobs are
    queued with their images, fail, and end on the dead-letter list; /metrics follows."""
    from conftest import free_port, store_files
    server = make_server(
        nodes=[{"name": "gone", "aet": "GONE", "host": LOCAL, "port": free_port()}],
        routing={"retry_delay": 0.2, "max_attempts": 1},
        routes=[{"name": "all", "to": "gone", "when": "stored"}])
    paths = write_series(tmp_path / "images", seed=3, images=3, size=16)
    assert store_files(server.dicom_port, paths) == [0, 0, 0]

    def jobs() -> tuple[float, float]:
        samples = scrape(server.http_url)
        return (value(samples, "pacsd_route_jobs", state="queued"),
                value(samples, "pacsd_route_jobs", state="dead"))
    wait_for(lambda: jobs() == (0, 3), 30, "three dead route jobs and none queued")


def test_last_stored_and_route_depths_on_either_index(index_url, make_server, tmp_path):
    """The reception time reads back as Unix time from SQLite's text and PostgreSQL's
    timestamp alike (both local time, as the index writes them)."""
    from conftest import store_files
    server = make_server(index={"url": index_url})
    assert ("pacsd_last_stored_timestamp_seconds", ()) not in scrape(server.http_url)
    t0 = time.time()
    assert store_files(server.dicom_port, write_series(tmp_path / "i", seed=5, images=1,
                                                       size=16)) == [0]
    samples = scrape(server.http_url)
    assert t0 - 2 <= value(samples, "pacsd_last_stored_timestamp_seconds") <= time.time() + 1
    assert value(samples, "pacsd_route_jobs", state="queued") == 0
    assert value(samples, "pacsd_index_readable") == 1
