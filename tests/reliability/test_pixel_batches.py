"""Hostile requests to the viewer's pixel batches (/dicom-web/.../series/{uid}/pixels, issue 19),
against a real in-process pacsd: too many instances, a huge query, bad and unknown UIDs,
another series' instances, duplicates, a wrong Accept, and a multi-frame instance with many
frames. Each refusal is the right HTTP status with one log line; what is answered is exactly the
stored frames; the server still serves afterwards.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import requests
from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).parent.parent))

from conftest import store_files  # noqa: E402
from data import write_series  # noqa: E402
from report import record  # noqa: E402

RAW = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'


def parts(r: requests.Response) -> list[tuple[str, bytes]]:
    """(Content-Location, body) of each part, cut by each part's Content-Length."""
    boundary = r.headers["Content-Type"].split("boundary=")[1].strip('"')
    body, out, pos = r.content, [], 0
    delim = b"--" + boundary.encode()
    pos = body.index(delim) + len(delim)
    while body[pos:pos + 2] != b"--":
        head_end = body.index(b"\r\n\r\n", pos)
        head = dict(line.split(": ", 1) for line in
                    body[pos + 2:head_end].decode("latin-1").split("\r\n"))
        start = head_end + 4
        end = start + int(head["Content-Length"])
        out.append((head["Content-Location"], body[start:end]))
        assert body[end:end + 2 + len(delim)] == b"\r\n" + delim
        pos = end + 2 + len(delim)
    return out


def test_hostile_pixel_batches(make_server, tmp_path, caplog):
    srv = make_server()
    files = write_series(tmp_path / "in", seed=51, series=2, images=6, size=32)
    # One multi-frame instance of 400 frames in the first series.
    many = dcmread(files[0])
    many.SOPInstanceUID = many.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.9.19.400"
    frames = np.arange(400 * 32 * 32, dtype=np.uint16).reshape(400, 32, 32) % 4096
    many.NumberOfFrames = 400
    many.PixelData = frames.tobytes()
    many.save_as(tmp_path / "many.dcm", enforce_file_format=True)
    files.append(tmp_path / "many.dcm")
    assert store_files(srv.dicom_port, files) == [0] * len(files)
    first = [dcmread(f) for f in files[:6]]
    other = dcmread(files[6], stop_before_pixels=True)
    study, series = first[0].StudyInstanceUID, first[0].SeriesInstanceUID
    url = f"{srv.http_url}/dicom-web/studies/{study}/series/{series}/pixels"
    sops = [d.SOPInstanceUID for d in first]

    def get(query: str, accept: str = RAW) -> requests.Response:
        return requests.get(f"{url}?{query}", headers={"Accept": accept}, timeout=30)

    # What it answers: each stored frame, in the order named, duplicates once.
    r = get("instances=" + ",".join(sops[::-1] + sops[:2]))
    assert r.status_code == 200
    got = parts(r)
    assert [loc.rsplit("/instances/", 1)[1] for loc, _ in got] == \
        [f"{s}/frames/1" for s in reversed(sops)]
    for (_, body), ds in zip(got, reversed(first), strict=True):
        assert body == ds.PixelData
    # The multi-frame instance: all 400 frames, each exactly.
    got = parts(get("instances=" + many.SOPInstanceUID))
    assert len(got) == 400
    assert all(body == frames[n].tobytes() for n, (_, body) in enumerate(got))
    assert got[-1][0].endswith("/frames/400")

    caplog.clear()
    caplog.set_level(logging.INFO, logger="pacsd")
    attacks = {
        "instances=" + ",".join(f"1.2.3.{i}" for i in range(201)): (400,),   # too many
        "instances=" + ",".join(f"1.2.3.{i}" for i in range(20000)): (400, 414, 431),   # huge
        "instances=1.2.abc": (400,),
        "instances=../../../etc/passwd": (400,),
        "instances=" + "1" * 70: (400,),              # longer than a UID may be
        "instances=": (400,),
        "": (400,),
        "instances=1.2.3.4.5": (404,),                # unknown
        f"instances={other.SOPInstanceUID}": (404,),  # another series'
    }
    refused = 0
    for query, allowed in attacks.items():
        r = get(query)
        assert r.status_code in allowed, (query[:60], r.status_code, r.text[:200])
        assert b"root:" not in r.content
        refused += r.status_code == 400
    # The 400s each said why in one line (the 414/431 are cheroot's, before any route).
    lines = [rec for rec in caplog.records if "/pixels" in rec.getMessage()]
    assert 4 <= len(lines) <= refused, [rec.getMessage() for rec in lines]
    assert get(f"instances={sops[0]}", accept="application/dicom").status_code == 406
    bad_study = requests.get(f"{srv.http_url}/dicom-web/studies/1.2.x/series/{series}/pixels"
                             f"?instances={sops[0]}", headers={"Accept": RAW}, timeout=10)
    assert bad_study.status_code == 400
    record("test_hostile_pixel_batches", bad_inputs=len(attacks) + 2)
    # Still serving, and a mixed list answers what is in the series.
    got = parts(get(f"instances=1.2.3.4.5,{sops[2]},{other.SOPInstanceUID}"))
    assert len(got) == 1 and got[0][1] == first[2].PixelData
