"""Private and unknown storage SOP classes (issue 18, point 8), and the one log line for the
presentation contexts an association had rejected.

DCMTK's storescu sends files of Siemens' and GE's private classes, as modalities do."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context

from conftest import LOCAL, associate, c_get, c_find, dcmtk, peer_env
from data import dataset_bytes, uid

SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"
GE_PRIVATE = "1.2.840.113619.4.26"
UNKNOWN_PUBLIC = "1.2.840.10008.5.1.4.1.1.999.1"   # under the storage root, in no release
# A service pacsd does not offer (the worklist it does since issue 23).
PRINT_MANAGEMENT = "1.2.840.10008.5.1.1.9"


def private_object(path: Path, sop_class: str, n: int) -> Path:
    """A non-image object of `sop_class`, with a private block of bytes, as a modality writes."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(80, n, 1)
    ds.PatientID, ds.PatientName = "PRIV-001", "Private^Classes"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(80, 1), uid(80, 1, n)
    ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20240301", "MR", n, 1
    ds.add_new(0x00290010, "LO", "SIEMENS CSA NON-IMAGE")
    ds.add_new(0x00291010, "OB", bytes(range(256)) * 4)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def storescu(port: int, paths: list[Path]) -> subprocess.CompletedProcess:
    """DCMTK's storescu, proposing each file's own SOP class in Explicit VR Little Endian: a
    profile (-xf), since storescu sends a class it does not know only when one names it."""
    classes = sorted({str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths})
    profile = paths[0].parent / "profile.cfg"
    profile.write_text("\n".join(
        ["[[TransferSyntaxes]]", "[Explicit]", f"TransferSyntax1 = {ExplicitVRLittleEndian}",
         "[[PresentationContexts]]", "[Contexts]"]
        + [f"PresentationContext{i} = {c}\\Explicit" for i, c in enumerate(classes, 1)]
        + ["[[Profiles]]", "[Private]", "PresentationContexts = Contexts"]) + "\n")
    return subprocess.run([dcmtk("storescu"), "-v", "-aet", "MODALITY", "-aec", "PACSD",
                           "-xf", str(profile), "Private", LOCAL, str(port), *map(str, paths)],
                          env=peer_env(), capture_output=True, text=True, timeout=60)


def context_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "pacsd.dimse.contexts" and r.levelno >= logging.INFO]


def test_storescu_stores_private_classes_as_received(server, tmp_path):
    paths = [private_object(tmp_path / "csa.dcm", SIEMENS_CSA_NON_IMAGE, 1),
             private_object(tmp_path / "ge.dcm", GE_PRIVATE, 2),
             private_object(tmp_path / "new.dcm", UNKNOWN_PUBLIC, 3)]
    proc = storescu(server.dicom_port, paths)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert server.index.counts()["instances"] == 3
    status, found = c_find(server.dicom_port, "IMAGE", StudyInstanceUID=uid(80, 1),
                           SeriesInstanceUID="", SOPInstanceUID="", SOPClassUID="")
    assert status == 0
    assert sorted(str(m.SOPClassUID) for m in found) == sorted(
        [SIEMENS_CSA_NON_IMAGE, GE_PRIVATE, UNKNOWN_PUBLIC])
    # Stored as received, and retrievable (C-GET proposes the private class with role selection)
    status, got = c_get(server.dicom_port, {"QueryRetrieveLevel": "IMAGE",
                                            "StudyInstanceUID": uid(80, 1),
                                            "SeriesInstanceUID": uid(80, 1, 1),
                                            "SOPInstanceUID": uid(80, 1, 1)},
                        SIEMENS_CSA_NON_IMAGE, ExplicitVRLittleEndian)
    assert status == 0 and got[uid(80, 1, 1)] == dataset_bytes(paths[0])


def test_the_setting_refuses_them_with_one_line(make_server, tmp_path, caplog):
    server = make_server(dicom={"accept_unknown_sop_classes": False})
    caplog.set_level(logging.INFO)
    path = private_object(tmp_path / "csa.dcm", SIEMENS_CSA_NON_IMAGE, 1)
    proc = storescu(server.dicom_port, [path])
    assert proc.returncode != 0 and server.index.counts()["instances"] == 0
    [line] = context_lines(caplog)
    assert "MODALITY" in line and SIEMENS_CSA_NON_IMAGE in line
    assert "refused by [dicom] accept_unknown_sop_classes = false" in line


def test_rejected_contexts_are_logged_once_per_association(server, caplog):
    """Each rejected context, once, in one line: CT offered in a made-up syntax in two
    contexts, a service we do not offer; the accepted ones are not listed."""
    caplog.set_level(logging.INFO)
    made_up_syntax = "1.2.826.0.1.3680043.9.9999.1"
    contexts = [build_context(CTImageStorage, [made_up_syntax]),
                build_context(CTImageStorage, [made_up_syntax]),
                build_context(PRINT_MANAGEMENT),
                build_context(CTImageStorage, [ImplicitVRLittleEndian])]
    with associate(server.dicom_port, contexts, aet="SCANNER1") as assoc:
        assert len(assoc.accepted_contexts) == 1
        assert len(assoc.rejected_contexts) == 3
    [line] = context_lines(caplog)
    assert "SCANNER1" in line and "2 presentation context(s) rejected" in line
    assert f"{CTImageStorage} (CT Image Storage): transfer syntax not supported" in line
    assert made_up_syntax in line
    assert f"{PRINT_MANAGEMENT} (Basic Grayscale Print Management Meta SOP Class): abstract " \
           "syntax not supported" in line
    assert line.count(CTImageStorage) == 1


def test_a_pynetdicom_scu_stores_an_unknown_class_over_a_known_syntax_order(server, tmp_path):
    """Our order of preference holds for unknown classes too: offered Implicit and Explicit VR
    in one context, Explicit is taken (pynetdicom's own unrestricted mode takes the first)."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(GE_PRIVATE, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    assoc = ae.associate(LOCAL, server.dicom_port, ae_title="PACSD")
    try:
        assert assoc.is_established
        [cx] = assoc.accepted_contexts
        assert cx.transfer_syntax[0] == ExplicitVRLittleEndian
        ds = dcmread(private_object(tmp_path / "ge.dcm", GE_PRIVATE, 4))
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
        ae.shutdown()
    assert server.index.counts()["instances"] == 1


def test_the_reliance_on_pynetdicom_is_checked(monkeypatch):
    """pacsd config --check says so if a pynetdicom release stops picking the service class
    from the accepted SOP Class Common Extended items; pacsd then refuses these classes."""
    from pacsd.compat import pynetdicom as compat
    assert compat.UNKNOWN_STORAGE.check().ok
    monkeypatch.setattr(compat.Association, "_serve_request", lambda self, msg, cx_id: None)
    finding = compat.UNKNOWN_STORAGE.check()
    assert not finding.ok and finding.kind == "speed"
    assert "Association._serve_request" in finding.message
    assert "private and unknown storage SOP classes are refused" in finding.message
