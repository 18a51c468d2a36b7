"""Orthanc (1.10, Debian's) as a real peer: started with a JSON configuration of ours on free
ports of 127.0.0.1, its REST API polled until it answers, killed afterwards (a throw-away
instance: its clean stop takes 3 s). Optionally with its DICOMweb plugin.

    with orthanc(tmp_path, dicomweb=True, DicomModalities={...}) as peer:
        peer.rest_json("/modalities/pacsd/query", {...})
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import LOCAL, free_port, peer_env, peer_missing, wait_for

BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def binary(dicomweb: bool = False) -> str:
    """Orthanc's executable (with its DICOMweb plugin if asked): a skip on a developer's
    machine without it, a failure in CI."""
    for path in BINARIES:
        if Path(path).exists() and (DICOMWEB_PLUGIN.exists() or not dicomweb):
            return path
    peer_missing("Orthanc with its DICOMweb plugin is not installed "
                 "(apt-get install orthanc orthanc-dicomweb)" if dicomweb else
                 "Orthanc is not installed (apt-get install orthanc)")


@dataclass
class Orthanc:
    proc: subprocess.Popen
    http_port: int
    dicom_port: int
    log: Path

    def rest(self, path: str, body: object = None, timeout: float = 30) -> bytes:
        """GET `path`, or POST `body` as JSON; the answer's bytes (HTTPError for 4xx/5xx)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{LOCAL}:{self.http_port}{path}", data=data)
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return rsp.read()

    def rest_json(self, path: str, body: object = None, timeout: float = 30) -> Any:
        return json.loads(self.rest(path, body, timeout))


@contextmanager
def orthanc(folder: Path, dicomweb: bool = False, aet: str = "ORTHANC",
            dicom_port: int | None = None, **config: Any) -> Iterator[Orthanc]:
    """A running Orthanc whose folders are under `folder`; `config` adds to (or replaces) its
    configuration (DicomModalities, DicomWeb, DefaultEncoding, ...)."""
    exe = binary(dicomweb)
    folder.mkdir(parents=True, exist_ok=True)
    http, dicom = free_port(), dicom_port or free_port()
    settings: dict[str, Any] = {
        "Name": "pacsd-tests", "DicomAet": aet, "DicomPort": dicom, "HttpPort": http,
        "StorageDirectory": str(folder / "orthanc"), "IndexDirectory": str(folder / "orthanc"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [], **config}
    (folder / "orthanc.json").write_text(json.dumps(settings))
    log = folder / "orthanc.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([exe, str(folder / "orthanc.json")], stdout=out,
                                stderr=subprocess.STDOUT, env=peer_env())
    peer = Orthanc(proc, http, dicom, log)

    def up() -> bool:
        try:
            return bool(peer.rest("/system", timeout=5))
        except OSError:
            assert proc.poll() is None, log.read_text()[-2000:]
            return False

    try:
        wait_for(up, 20, "Orthanc's REST API")
        yield peer
    finally:
        proc.kill()
        proc.wait(10)
