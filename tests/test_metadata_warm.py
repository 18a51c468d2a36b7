"""[storage] warm_metadata: a study's DICOMweb metadata cached when it turns stable, with a real
server (in process) and instances stored over C-STORE with pynetdicom."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests
from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).parent))
from conftest import store_files  # noqa: E402
from data import ct_slice  # noqa: E402



@pytest.mark.parametrize("warm", [True, False])
def test_metadata_is_cached_when_the_study_turns_stable(make_server, tmp_path, warm):
    """[storage] warm_metadata: once a study is stable its instances' metadata is in the cache
    before anyone asks (so the first WADO-RS metadata request reads no header); off, only a
    request builds it. The on_study_stable hook, which runs after the warm-up, marks the moment."""
    from pacsd.query.studies import instance_path
    marker = tmp_path / "stable.txt"
    hook = tmp_path / "plugins" / "mark.py"
    hook.parent.mkdir()
    hook.write_text(textwrap.dedent(f"""
        from pathlib import Path
        def on_study_stable(event):
            Path({str(marker)!r}).write_text(event["study_uid"])
    """))
    server = make_server(hooks={"plugins": [str(hook)], "study_stable_after": 0.5},
                         storage={"warm_metadata": warm})
    paths = []
    for n in range(1, 4):
        ds = ct_slice(seed=12, patient=1, study=1, series=1, number=n, size=16)
        paths.append(tmp_path / f"i{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    assert store_files(server.dicom_port, paths) == [0, 0, 0]
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == ds.StudyInstanceUID
    root = server.runtime.archive.store.root / ".cache" / "metadata"
    entries = [root / (instance_path(dcmread(p).SOPInstanceUID) + ".json") for p in paths]
    assert [e.exists() for e in entries] == [warm] * 3
    url = f"{server.http_url}/dicom-web/studies/{ds.StudyInstanceUID}/metadata"
    got = requests.get(url, timeout=10).json()
    assert len(got) == 3 and all(e.exists() for e in entries)


def test_a_series_metadata_is_joined_in_memory_and_follows_every_change(make_server, tmp_path):
    """A series' metadata is answered from one joined text kept in memory (the viewer waits for
    it before asking for pixels): the same JSON as instance by instance, its BulkDataURIs naming
    the host the client used, and never stale: an instance added, one deleted, a stored file
    rewritten in place each show at once."""
    import os

    from pacsd.storage import metadata as cached
    server = make_server()
    paths = []
    for n in range(1, 5):
        ds = ct_slice(seed=13, patient=1, study=1, series=1, number=n, size=16)
        paths.append(tmp_path / f"j{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    assert store_files(server.dicom_port, paths[:3]) == [0, 0, 0]
    study, series = ds.StudyInstanceUID, ds.SeriesInstanceUID
    url = f"{server.http_url}/dicom-web/studies/{study}/series/{series}/metadata"

    def sops(answer) -> list[str]:
        return sorted(x["00080018"]["Value"][0] for x in answer)

    first = requests.get(url, timeout=10)
    assert first.status_code == 200 and len(first.json()) == 3
    assert any(slot[1] == ("metadata", study, series) for slot in cached._joined)
    # The same as each instance's own metadata, BulkDataURIs included.
    singles = [requests.get(f"{server.http_url}/dicom-web/studies/{study}/series/{series}"
                            f"/instances/{x['00080018']['Value'][0]}/metadata", timeout=10).json()[0]
               for x in first.json()]
    assert first.json() == singles
    assert all(x["7FE00010"]["BulkDataURI"].startswith(server.http_url) for x in first.json())
    # Another host name for the same server: its URLs, from the same joined text.
    other = url.replace("127.0.0.1", "localhost")
    assert other != url
    got = requests.get(other, timeout=10).json()
    assert all(x["7FE00010"]["BulkDataURI"].startswith("http://localhost:") for x in got)
    # Added: the fourth instance is in the next answer.
    assert store_files(server.dicom_port, paths[3:]) == [0]
    assert sops(requests.get(url, timeout=10).json()) == sorted(
        str(dcmread(p).SOPInstanceUID) for p in paths)
    # A stored file rewritten in place (a restore from a backup): its new header is served.
    from pacsd.query.studies import instance_path
    rel = instance_path(dcmread(paths[0]).SOPInstanceUID)
    stored = server.runtime.archive.store.path(rel)
    ds0 = dcmread(stored)
    ds0.SeriesDescription = "RESTORED"
    ds0.save_as(stored, enforce_file_format=True)
    st = os.stat(stored)
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    got = requests.get(url, timeout=10).json()
    desc = {x["00080018"]["Value"][0]: x.get("0008103E", {}).get("Value", [""])[0] for x in got}
    assert desc[str(ds0.SOPInstanceUID)] == "RESTORED"
    # Deleted: gone from the next answer.
    gone = str(dcmread(paths[1]).SOPInstanceUID)
    assert server.runtime.archive.delete("IMAGE", [gone]) == 1
    assert gone not in sops(requests.get(url, timeout=10).json())
