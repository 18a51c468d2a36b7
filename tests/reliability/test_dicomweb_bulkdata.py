"""Hostile requests to the DICOMweb resources of issue 18, against a real in-process pacsd.

- Bulk data paths: traversal (raw `..`, encoded), paths nested past the limit, huge item
  numbers, a huge path, paths naming no bulk data: each is 400 or 404, no file content leaks,
  and the server still answers.
- Accept headers for metadata and QIDO-RS: thousands of media ranges, nothing acceptable: 406.
- Many clients asking for the same series' metadata at once, before it is cached: every answer
  is the same, the cache holds one entry per instance and no temporary file is left behind.
"""

from __future__ import annotations

import http.client
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).parent.parent))

from conftest import LOCAL, store_files  # noqa: E402
from data import write_series  # noqa: E402
from report import record  # noqa: E402


def raw_get(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A GET with the target sent as written (no client-side normalisation of `..`)."""
    conn = http.client.HTTPConnection(LOCAL, port, timeout=10)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_hostile_bulkdata_paths_and_accept_headers(make_server, tmp_path):
    srv = make_server()
    files = write_series(tmp_path / "in", seed=41, images=4, size=64)
    assert store_files(srv.dicom_port, files) == [0] * 4
    ds = dcmread(files[0], stop_before_pixels=True)
    inst = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
            f"instances/{ds.SOPInstanceUID}")
    port = int(srv.http_url.rsplit(":", 1)[1])
    secret = b"root:"
    attacks = {
        "/bulkdata/../../../../../../etc/passwd": (400, 404),
        "/bulkdata/..%2f..%2f..%2f..%2fetc%2fpasswd": (400, 404),
        "/bulkdata/%2e%2e/%2e%2e/7FE00010": (400, 404),
        "/bulkdata/7FE00010/../../../metadata": (400, 404),
        "/bulkdata/" + "/".join(["00081140/0"] * 9) + "/00081150": (400,),
        "/bulkdata/00081140/999999/00081150": (404,),
        "/bulkdata/00081140/-1/00081150": (400,),
        "/bulkdata/" + "7FE00010" * 1000: (400, 414),
        "/bulkdata/00100010": (404,),
        "/bulkdata/7fe00010x": (400,),
        "/bulkdata/7FE00010%00": (400,),
    }
    for path, allowed in attacks.items():
        status, body = raw_get(port, inst + path)
        assert status in allowed, (path, status, body[:200])
        assert secret not in body
    record("test_hostile_bulkdata_paths_and_accept_headers", bad_inputs=len(attacks))
    # Accept headers: thousands of ranges, none acceptable.
    huge = ", ".join(f"text/x-{i}" for i in range(2000))
    for target in (inst + "/metadata", "/dicom-web/studies"):
        r = requests.get(srv.http_url + target, headers={"Accept": huge}, timeout=10)
        assert r.status_code in (406, 431), (target, r.status_code)
    # Still serving.
    status, body = raw_get(port, inst + "/bulkdata/7FE00010")
    assert status == 200 and len(body) > 64 * 64 * 2


def test_concurrent_first_metadata_requests(make_server, tmp_path):
    srv = make_server()
    files = write_series(tmp_path / "in", seed=42, images=20, size=64)
    assert store_files(srv.dicom_port, files) == [0] * 20
    ds = dcmread(files[0], stop_before_pixels=True)
    url = (f"{srv.http_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
           f"{ds.SeriesInstanceUID}/metadata")

    def get(_: int) -> bytes:
        r = requests.get(url, timeout=60)
        assert r.status_code == 200
        return r.content
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(get, range(16)))
    assert len(set(answers)) == 1 and answers[0].count(b'"00080018"') == 20
    cache = srv.runtime.archive.store.root / ".cache" / "metadata"
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert len(entries) == 20 and all(p.name.endswith(".dcm.json") for p in entries)
