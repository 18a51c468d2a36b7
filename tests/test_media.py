"""pacsd.imaging.media: a ZIP holding a PS3.10 File-set and its DICOMDIR, streamed.

Checked with zipfile (opens, CRCs, bytes unchanged), pydicom (FileSet reads the DICOMDIR and
finds every instance where the hierarchy says), DCMTK (dcmdump parses it; dcmmkdir accepts the
files and File IDs under the General Purpose CD-R profile and builds the same hierarchy), and,
when installed, dicom3tools (dciodvfy validates the Basic Directory IOD, dcdirdmp walks the
records by their offsets).
"""

from __future__ import annotations

import io
import re
import shutil
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian

from conftest import dcmtk, run_peer
from data import uid, write_series
from pacsd.imaging.media import zip_stream

FILE_ID = re.compile(r"[A-Z0-9_]{1,8}(/[A-Z0-9_]{1,8}){0,7}")


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def basic_text_sr(like: Path, folder: Path) -> Path:
    """A Basic Text SR in the study of the file `like` (its own series)."""
    src = dcmread(like, stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid("sr", like.name)
    ds.SOPClassUID = BasicTextSRStorage
    ds.SpecificCharacterSet = "ISO_IR 100"
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
               "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
               "ReferringPhysicianName"):
        setattr(ds, kw, src.get(kw))
    ds.Modality = "SR"
    ds.SeriesInstanceUID = uid("sr series", like.name)
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.Manufacturer = "pacsd-tests"
    ds.ContentDate, ds.ContentTime = "20240102", "101500"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = Sequence([code("11528-7", "LN", "Radiology Report")])
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    text = Dataset()
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    text.ConceptNameCodeSequence = Sequence([code("121071", "DCM", "Finding")])
    text.TextValue = "No acute findings."
    language = Dataset()   # the one kind of item a directory record keeps (PS3.3 F.5.21)
    language.RelationshipType, language.ValueType = "HAS CONCEPT MOD", "CODE"
    language.ConceptNameCodeSequence = Sequence([
        code("121049", "DCM", "Language of Content Item and Descendants")])
    language.ConceptCodeSequence = Sequence([code("en", "RFC5646", "English")])
    ds.ContentSequence = Sequence([language, text])
    path = folder / "report.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    """2 patients x 1 study x 2 CT series x 3 images, and an SR in the first patient's study."""
    folder = tmp_path_factory.mktemp("sources")
    paths = write_series(folder, patients=2, studies=1, series=2, images=3, size=64)
    return paths + [basic_text_sr(paths[0], folder)]


@pytest.fixture(scope="module")
def unzipped(sources: list[Path], tmp_path_factory) -> Path:
    """The archive, extracted (the archive itself is next to it as media.zip)."""
    folder = tmp_path_factory.mktemp("media")
    archive = folder / "media.zip"
    with open(archive, "wb") as out:
        out.writelines(zip_stream(sources))
    root = folder / "root"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(root)
    return root


def sop_uid(data: bytes) -> str:
    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def test_zip_holds_every_file_unchanged_under_conformant_ids(sources, unzipped):
    with zipfile.ZipFile(unzipped.parent / "media.zip") as zf:
        assert zf.testzip() is None   # every CRC checks
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names[-1] == "DICOMDIR" and len(names) == len(sources) + 1
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        assert all(i.flag_bits & 0x08 for i in infos)   # written unseekable: data descriptors
        for name in names:
            # PS3.10 8.5 / PS3.3 F.3.2.2: at most 8 components of at most 8 of A-Z 0-9 _
            assert FILE_ID.fullmatch(name), name
        stored = {sop_uid(zf.read(n)): zf.read(n) for n in names[:-1]}
    assert stored == {sop_uid(p.read_bytes()): p.read_bytes() for p in sources}
    # No patient data in the names: only record-type prefixes and counters.
    assert all(re.fullmatch(r"DICOM/PT\d{6}/ST\d{6}/(SE\d{6}/)?(IM|SR)\d{6}", n)
               for n in names[:-1]), names


def test_dicomdir_lists_every_instance_in_its_hierarchy(sources, unzipped):
    fs = FileSet(dcmread(unzipped / "DICOMDIR"))
    assert len(fs) == len(sources)
    for path in sources:
        ds = dcmread(path, stop_before_pixels=True)
        [inst] = fs.find(SOPInstanceUID=ds.SOPInstanceUID)
        assert Path(inst.path).read_bytes() == path.read_bytes()
        leaf = inst.node
        series, study, patient = leaf.ancestors
        assert patient.record_type == "PATIENT" and patient.key == ds.PatientID
        assert study.record_type == "STUDY" and study.key == ds.StudyInstanceUID
        assert series.record_type == "SERIES" and series.key == ds.SeriesInstanceUID
        assert leaf.record_type == ("SR DOCUMENT" if ds.Modality == "SR" else "IMAGE")
        assert inst.ReferencedTransferSyntaxUIDInFile == ds.file_meta.TransferSyntaxUID
        assert list(inst.ReferencedFileID) == list(
            Path(inst.path).relative_to(unzipped).parts)
    patients = fs._tree.children
    assert [len(p.children) for p in patients] == [1, 1]
    assert [len(p.children[0].children) for p in patients] == [3, 2]   # 2 CT + SR, 2 CT


def dcmtk_tree(dicomdir: Path) -> list[tuple[str, str]]:
    """(record type, Referenced File ID) of each record, in order, as dcmdump reads them."""
    out = run_peer([dcmtk("dcmdump"), "+F", "-q", str(dicomdir)]).stdout
    return re.findall(r'"Directory Record" (\S+(?: \S+)?) #=\d+.*\n.*?'
                      r'(?:refFileID="([^"]*)")?\n', out)


@pytest.mark.peers
def test_dcmtk_reads_the_dicomdir_and_builds_the_same_one(unzipped, tmp_path):
    ours = dcmtk_tree(unzipped / "DICOMDIR")
    assert [t for t, _ in ours].count("IMAGE") == 12 and ("SR DOCUMENT", ) == tuple(
        t for t, _ in ours if t not in ("PATIENT", "STUDY", "SERIES", "IMAGE"))
    # dcmmkdir refuses non-conformant File IDs and files outside the General Purpose CD-R
    # profile (STD-GEN-CD); given the same files, its DICOMDIR must list what ours lists.
    work = tmp_path / "dcmtk"
    shutil.copytree(unzipped / "DICOM", work / "DICOM")
    run_peer([dcmtk("dcmmkdir"), "-Pgp", "-I", "+r", "+id", str(work), "DICOM",
              "+D", str(work / "DICOMDIR")])
    theirs = dcmtk_tree(work / "DICOMDIR")

    def records(tree):
        return sorted((t, f) for t, f in tree if f) + [("levels", str(sorted(
            t for t, f in tree if not f)))]
    assert records(ours) == records(theirs)


@pytest.mark.parametrize("tool", ["dciodvfy", "dcdirdmp"])
def test_dicom3tools_validate_the_dicomdir(unzipped, sources, tool):
    exe = dcmtk(tool, package="dicom3tools")
    out = run_peer([exe, str(unzipped / "DICOMDIR")], check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    if tool == "dciodvfy":
        assert "BasicDirectory" in text
        assert not re.search(r"^(Error|Warning)", text, re.MULTILINE), text
    else:   # the tree, found by following the records' offsets
        assert len(re.findall(r"-> DICOM\\PT\d+\\ST\d+\\SE\d+\\(IM|SR)\d+", text)) == len(sources)


def test_non_image_objects_get_their_own_record_type(unzipped):
    fs = FileSet(dcmread(unzipped / "DICOMDIR"))
    [sr] = fs.find(SOPClassUID=BasicTextSRStorage)
    assert sr.node.record_type == "SR DOCUMENT"
    record = sr.node._record
    assert record.ConceptNameCodeSequence[0].CodeValue == "11528-7"
    assert [i.RelationshipType for i in record.ContentSequence] == ["HAS CONCEPT MOD"]
    assert Path(sr.path).name.startswith("SR")


def test_missing_type_1_values_are_made_up_for_the_dicomdir_only(tmp_path):
    [path] = write_series(tmp_path, images=1, size=16)
    ds = dcmread(path)
    del ds.StudyID
    ds.StudyTime = ""
    ds.save_as(path)
    data = b"".join(zip_stream([path]))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.read("DICOM/PT000000/ST000000/SE000000/IM000000") == path.read_bytes()
        record = dcmread(io.BytesIO(zf.read("DICOMDIR"))).DirectoryRecordSequence[1]
    assert record.DirectoryRecordType == "STUDY" and record.StudyID and record.StudyTime


def test_unlisted_and_repeated_files(tmp_path):
    paths = write_series(tmp_path, images=2, size=16)
    odd = tmp_path / "odd.dcm"   # no record can be made: the SR record needs a concept name
    sr = basic_text_sr(paths[0], tmp_path)
    ds = dcmread(sr)
    del ds.ConceptNameCodeSequence
    ds.save_as(odd)
    data = b"".join(zip_stream([paths[0], odd, paths[1], paths[0]]))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["DICOM/PT000000/ST000000/SE000000/IM000000",
                                 "DICOM/UNLISTED/IM000000",
                                 "DICOM/PT000000/ST000000/SE000000/IM000001", "DICOMDIR"]
        assert zf.read("DICOM/UNLISTED/IM000000") == odd.read_bytes()


def test_without_dicomdir_names_are_flat(sources):
    data = b"".join(zip_stream(sources[:3], dicomdir=False))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["DICOM/IM000000", "DICOM/IM000001", "DICOM/IM000002"]
        assert [zf.read(n) for n in zf.namelist()] == [p.read_bytes() for p in sources[:3]]


def test_bytes_flow_before_the_next_file_is_opened(sources):
    opened = []

    def paths():
        for p in sources:
            opened.append(p)
            yield p
    stream = zip_stream(paths())
    next(stream)
    assert len(opened) == 1


def test_a_200_mb_series_streams_in_bounded_memory(tmp_path):
    paths = write_series(tmp_path, images=400, size=512)   # 400 x 512 KB
    total = sum(p.stat().st_size for p in paths)
    assert total > 200e6
    tracemalloc.start()
    try:
        size = 0
        for chunk in zip_stream(paths):
            size += len(chunk)
            last = chunk
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size > total and b"PK\x05\x06" in last   # ends with the End of Central Directory
    assert peak < 30e6, f"peak {peak / 1e6:.1f} MB of Python allocations"
