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
