"""WADO-URI (PS3.18 chapter 9) over real HTTP: the stored file unchanged, rendered JPEG / PNG,
and the error answers. One server for the module: the samples are stored once."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian

from pacsd import config as config_mod
from pacsd.daemon.server import Server
from pacsd.index.models import Instance

from conftest import store_files, write_config
from data import ct_slice, dataset_bytes, sample, uid

# Every pydicom test file with pixels that we render, and the syntax it exercises.
SAMPLES = ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm",
           "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
           "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm", "JPEG-lossy.dcm"]


class Stored:
    """What was stored: file name -> (study, series, object UID, the file sent)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.url = server.http_url + "/wado"
        self.objects: dict[str, tuple[str, str, str, Path]] = {}

    def params(self, name: str, **extra: object) -> dict[str, object]:
        study, series, obj, _ = self.objects[name]
        return {"requestType": "WADO", "studyUID": study, "seriesUID": series,
                "objectUID": obj, **extra}

    def get(self, name: str, **extra: object) -> requests.Response:
        return requests.get(self.url, params=self.params(name, **extra), timeout=30)

    def image(self, name: str, **extra: object) -> Image.Image:
        r = self.get(name, **extra)
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(r.content))
        img.load()
        return img

    def stored_path(self, name: str) -> Path:
        assert self.server.index is not None
        with self.server.index.reading():
            rel = Instance.get(Instance.sop_instance_uid == self.objects[name][2]).path
        return Path(self.server.cfg.storage_path) / rel


def _copy_with_new_uid(src: Path, dst: Path, tag: str) -> Path:
    """pydicom's MR_small* files share one SOP Instance UID: give each copy its own."""
    ds = dcmread(src)
    new = uid("wado", tag)
    ds.SOPInstanceUID = new
    ds.file_meta.MediaStorageSOPInstanceUID = new
    ds.save_as(dst)
    return dst


@pytest.fixture(scope="module")
def wado(tmp_path_factory) -> Stored:
    tmp = tmp_path_factory.mktemp("wado")
    cfg = config_mod.load(write_config(tmp / "pacsd.toml", tmp / "data"), env={})
    server = Server(cfg).start()
    try:
        stored = Stored(server)
        files: dict[str, Path] = {}
        for name in SAMPLES:
            path = sample(name)
            if name.startswith("MR_small_") or name == "JPEG-lossy.dcm":
                path = _copy_with_new_uid(path, tmp / name, name)
            files[name] = path
        # (its File Meta names another SOP Instance than its data set: give both one UID)
        files["rtplan.dcm"] = _copy_with_new_uid(sample("rtplan.dcm"), tmp / "rtplan.dcm", "rt")
        mono2 = ct_slice(seed=7, patient=1, study=1, series=1, number=1)
        mono1 = ct_slice(seed=7, patient=1, study=1, series=1, number=1)
        mono1.PhotometricInterpretation = "MONOCHROME1"
        mono1.SOPInstanceUID = mono1.file_meta.MediaStorageSOPInstanceUID = uid("wado", "m1")
        for name, ds in (("ct_mono2", mono2), ("ct_mono1", mono1)):
            files[name] = tmp / f"{name}.dcm"
            ds.save_as(files[name], enforce_file_format=True)
        assert set(store_files(server.dicom_port, list(files.values()))) == {0}
        for name, path in files.items():
            ds = dcmread(path, stop_before_pixels=True)
            stored.objects[name] = (ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                    ds.SOPInstanceUID, path)
        yield stored
    finally:
        server.stop()


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


# --- application/dicom --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm"])
def test_application_dicom_is_the_stored_file_byte_for_byte(wado, name, tmp_path):
    r = wado.get(name, contentType="application/dicom")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/dicom"
    assert r.content == wado.stored_path(name).read_bytes()
    assert int(r.headers["Content-Length"]) == len(r.content)
    assert "attachment" in r.headers["Content-Disposition"]
    # The data set after the File Meta group is the one that was sent, unchanged.
    sent_ts, sent = dataset_bytes(wado.objects[name][3])
    (tmp_path / "got.dcm").write_bytes(r.content)
    assert dataset_bytes(tmp_path / "got.dcm") == (sent_ts, sent)


def test_application_dicom_syntax_same_or_converted_or_406(wado):
    stored_ts = str(dcmread(sample("CT_small.dcm")).file_meta.TransferSyntaxUID)
    assert wado.get("CT_small.dcm", contentType="application/dicom",
                    transferSyntax=stored_ts).status_code == 200
    r = wado.get("CT_small.dcm", contentType="application/dicom",
                 transferSyntax=ImplicitVRLittleEndian)
    assert r.status_code == 200
    ds = dcmread(io.BytesIO(r.content))
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert np.array_equal(ds.pixel_array, dcmread(sample("CT_small.dcm")).pixel_array)
    r = wado.get("SC_rgb_jpeg_dcmtk.dcm", contentType="application/dicom",
                 transferSyntax="1.2.840.10008.1.2.1")
    assert r.status_code == 406 and "stored as" in r.text


def test_a_non_image_defaults_to_application_dicom_and_refuses_rendering(wado):
    r = wado.get("rtplan.dcm")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/dicom"
    assert wado.get("rtplan.dcm", contentType="image/jpeg").status_code == 400


# --- rendered images ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_renders(wado, name):
    img = wado.image(name, rows=96, columns=96)
    assert img.format == "JPEG" and max(img.size) == 96 and min(img.size) >= 1
    assert _pixels(img).std() > 10, "a flat image"


def test_jpeg_is_the_default_and_png_on_request(wado):
    r = wado.get("ct_mono2")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert r.headers["Content-Disposition"].startswith("inline")
    assert int(r.headers["Content-Length"]) == len(r.content)
    img = Image.open(io.BytesIO(r.content))
    assert (img.format, img.mode, img.size) == ("JPEG", "L", (512, 512))
    png = wado.image("ct_mono2", contentType="image/png")
    assert (png.format, png.size) == ("PNG", (512, 512))
    # A preference list: the first type we can produce wins.
    r = wado.get("ct_mono2", contentType="image/gif,image/png")
    assert r.headers["Content-Type"] == "image/png"


def test_rows_and_columns_are_a_box_and_keep_the_aspect_ratio(wado):
    assert wado.image("ct_mono2", rows=128).size == (128, 128)
    assert wado.image("ct_mono2", rows=100, columns=200).size == (100, 100)
    assert wado.image("ct_mono2", columns=64).size == (64, 64)
    # JPEG2000.dcm is 256 columns x 1024 rows.
    assert wado.image("JPEG2000.dcm", rows=256, columns=256).size == (64, 256)
    assert wado.image("MR_small.dcm", rows=128, columns=128).size == (128, 128)   # 64 x 64


def test_window_changes_the_output_and_defaults_to_the_stored_one(wado):
    stored = _pixels(wado.image("ct_mono2", contentType="image/png"))
    same = _pixels(wado.image("ct_mono2", contentType="image/png", windowCenter=40,
                              windowWidth=400))
    wide = _pixels(wado.image("ct_mono2", contentType="image/png", windowCenter=-500,
                              windowWidth=3000))
    assert np.array_equal(stored, same)
    assert np.abs(stored - wide).mean() > 10
    assert wide.std() > 10


def test_monochrome1_is_rendered_inverted(wado):
    m2 = _pixels(wado.image("ct_mono2", contentType="image/png"))
    m1 = _pixels(wado.image("ct_mono1", contentType="image/png"))
    assert m2.std() > 10
    assert np.array_equal(m1, 255 - m2)


def test_rgb_and_frames(wado):
    img = wado.image("SC_rgb_jpeg_dcmtk.dcm", contentType="image/png")
    assert img.mode == "RGB" and img.size == (100, 100)
    assert np.allclose(_pixels(img)[5, 50], [255, 0, 0], atol=12)   # the red band on top
    f1 = _pixels(wado.image("SC_rgb_rle_2frame.dcm", contentType="image/png"))
    f2 = _pixels(wado.image("SC_rgb_rle_2frame.dcm", contentType="image/png", frameNumber=2))
    assert np.array_equal(f1 + f2, np.full_like(f1, 255))   # frame 2 is frame 1 inverted
    assert wado.get("SC_rgb_rle_2frame.dcm", frameNumber=3).status_code == 400


def test_image_quality_changes_the_jpeg_size(wado):
    low = wado.get("ct_mono2", imageQuality=10).content
    high = wado.get("ct_mono2", imageQuality=95).content
    assert len(low) < len(high)


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    {"requestType": "WADO-RS"},
    {"objectUID": ""},
    {"studyUID": "1.2.abc"},
    {"seriesUID": "01.2"},
    {"rows": "0"},
    {"columns": "x"},
    {"windowCenter": "40"},
    {"windowCenter": "40", "windowWidth": "0"},
    {"frameNumber": "0"},
    {"imageQuality": "101"},
    {"contentType": "application/dicom", "rows": "10"},
    {"contentType": "image/jpeg", "transferSyntax": "1.2.840.10008.1.2"},
    {"anonymize": "no"},
])
def test_bad_parameters_are_400(wado, extra):
    params = wado.params("CT_small.dcm")
    params.update(extra)
    r = requests.get(wado.url, params=params, timeout=10)
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("text/plain") and r.text.strip()


def test_unknown_object_404_unsupported_type_406_anonymize_501(wado):
    assert wado.get("CT_small.dcm", objectUID="1.2.3.4").status_code == 404
    # The object exists, but not in that series.
    assert wado.get("CT_small.dcm", seriesUID="1.2.3").status_code == 404
    r = wado.get("CT_small.dcm", contentType="image/gif")
    assert r.status_code == 406 and "application/dicom" in r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    r = wado.get("CT_small.dcm", anonymize="yes")
    assert r.status_code == 501 and "anonymize" in r.text
    assert r.headers["Content-Type"].startswith("text/plain")
