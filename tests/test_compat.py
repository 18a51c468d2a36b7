"""pacsd.compat: every patch of a library's internals fits the installed versions; when a library
changes, a speed patch warns once and falls back, and the safety patch stops `pacsd serve`."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading
import zipfile
from collections import UserDict
from pathlib import Path
from types import SimpleNamespace

import pytest
from cheroot import server as cheroot_server
from conftest import write_config
from pydicom import filereader
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet
from pynetdicom.dul import DULServiceProvider

from pacsd import compat
from pacsd.compat import cheroot as compat_cheroot
from pacsd.compat import pydicom as compat_pydicom
from pacsd.compat import pynetdicom as compat_pynetdicom
from pacsd.errors import EXIT_CONFIG, LibraryMismatch


@pytest.fixture(autouse=True)
def fresh_patches():
    """Each test settles the patches anew, and leaves them unsettled for the next (whose
    libraries are whole again)."""
    for p in compat.patches():
        p.reset()
    yield
    for p in compat.patches():
        p.reset()


def test_every_patch_fits_the_installed_libraries(caplog):
    findings = compat.check()
    assert {f.name.split(".")[0] for f in findings} == {"pynetdicom", "pydicom", "cheroot"}
    assert [f for f in findings if not f.ok] == []
    assert [f.kind for f in findings if f.kind == "safety"] == ["safety"]
    with caplog.at_level(logging.WARNING):
        assert all(f.ok for f in compat.enforce())
    assert not caplog.records


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_speed_patch_that_no_longer_fits_warns_once_and_pynetdicom_polls(monkeypatch, caplog):
    monkeypatch.delattr(DULServiceProvider, "_send")
    finding = compat_pynetdicom.PACE.check()
    assert not finding.ok and finding.kind == "speed"
    assert "DULServiceProvider._send (gone)" in finding.message
    dul = SimpleNamespace()
    event = SimpleNamespace(assoc=SimpleNamespace(dul=dul, is_acceptor=True))
    with caplog.at_level(logging.WARNING):
        compat.enforce()   # a speed misfit does not stop the start
        compat_pynetdicom.wake_on_work(event)   # type: ignore[arg-type]
        compat_pynetdicom.wake_on_work(event)   # type: ignore[arg-type]
        compat_pynetdicom.drop_wakeups(event)   # type: ignore[arg-type]
    assert type(dul) is SimpleNamespace and not vars(dul)   # left as pynetdicom made it
    assert _warnings(caplog) == [
        f"pynetdicom {compat.patch.version('pynetdicom')} changed DULServiceProvider._send "
        "(gone); using pynetdicom's own polling"]


def test_the_reactor_leaves_a_paused_senders_response_alone():
    """pynetdicom's reactor, just past its checkpoint, took the response that a send from
    another thread waited for (issues #435, #875); the sender then got nothing for the DIMSE
    timeout (measured: once in about 500 store-then-echo associations; a CI failure)."""
    from pynetdicom.dimse import DIMSEServiceProvider

    got: list = []

    class Reactor(threading.Thread):   # what DIMSEServiceProvider reads of its association
        dimse_timeout = 1

        def __init__(self) -> None:
            super().__init__(daemon=True)
            self._reactor_checkpoint = threading.Event()   # cleared: a sender paused us

        def run(self) -> None:
            got.append(dimse.get_msg(block=False))
            self._reactor_checkpoint.set()                 # the sender is done
            got.append(dimse.get_msg(block=False))

    reactor = Reactor()
    dimse = DIMSEServiceProvider(reactor)   # type: ignore[arg-type]
    dimse.msg_queue.put((1, "the sender's response"))
    reactor.start()
    reactor.join(5)
    assert got == [(None, None), (1, "the sender's response")]
    # The sender itself (another thread) takes it whatever the checkpoint says.
    reactor._reactor_checkpoint.clear()
    dimse.msg_queue.put((3, "response"))
    assert dimse.get_msg(block=False) == (3, "response")


def test_reactor_parking_falls_back_to_pynetdicom_own_pausing(monkeypatch, caplog):
    monkeypatch.setattr(compat_pynetdicom.Association, "send_c_store", lambda self: None)
    assoc = SimpleNamespace()   # touched, it would raise
    with caplog.at_level(logging.WARNING):
        assert compat_pynetdicom.park_reactor(assoc) is False   # type: ignore[arg-type]
    assert len(_warnings(caplog)) == 1
    assert "pynetdicom pauses its reactor itself" in _warnings(caplog)[0]


def test_the_pdu_bound_that_no_longer_fits_refuses_to_start(monkeypatch):
    monkeypatch.delattr(DULServiceProvider, "_read_pdu_data")
    bad = [f for f in compat.check() if not f.ok]
    # The fast lane reads PDUs in the DUL's place (through the same bounded socket): it no
    # longer fits either, a speed patch that only warns.
    assert [(f.name, f.kind) for f in bad] == [("pynetdicom.pdu_size_bound", "safety"),
                                               ("pynetdicom.fast_lane", "speed")]
    with pytest.raises(LibraryMismatch) as e:
        compat.enforce()
    assert e.value.exit_code == EXIT_CONFIG
    assert "_read_pdu_data (gone)" in str(e.value) and "refuses to start" in str(e.value)


def test_cheroot_guards_fall_back_to_cheroot_own_reading(monkeypatch, caplog):
    monkeypatch.delattr(cheroot_server.HTTPServer, "put_conn")
    monkeypatch.setattr(compat_cheroot, "StreamReader", io.BufferedReader)
    with caplog.at_level(logging.WARNING):
        assert not compat_cheroot.HEAD_GUARD.fits
        assert not compat_cheroot.BODY_DEADLINE.fits
        assert not compat_cheroot.HEAD_GUARD.fits
    assert len(_warnings(caplog)) == 2
    assert "as cheroot does" in _warnings(caplog)[0]


def test_dicomdir_records_fall_back_to_a_zip_without_dicomdir(monkeypatch, caplog):
    from pacsd.imaging.media import zip_stream
    path = Path(get_testdata_file("CT_small.dcm"))
    with zipfile.ZipFile(io.BytesIO(b"".join(zip_stream([path])))) as zf:
        assert "DICOMDIR" in zf.namelist()
    monkeypatch.delattr(FileSet, "_write_dicomdir")
    compat_pydicom.DICOMDIR_RECORDS.reset()
    with caplog.at_level(logging.WARNING):
        body = b"".join(zip_stream([path]))
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.namelist() == ["DICOM/IM000000"]
        assert zf.read("DICOM/IM000000") == path.read_bytes()
    assert len(_warnings(caplog)) == 1 and "without a DICOMDIR" in _warnings(caplog)[0]


def test_file_meta_is_read_alike_without_pydicom_private_reader(monkeypatch):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()

    def read() -> tuple[dict, int]:
        f = io.BytesIO(data)
        filereader.read_preamble(f, False)
        meta = compat_pydicom.read_file_meta(f)
        return {e.keyword: e.value for e in meta}, f.tell()
    expected = read()
    monkeypatch.delattr(filereader, "_read_file_meta_info")
    compat_pydicom.FILE_META.reset()
    assert not compat_pydicom.FILE_META.fits
    assert read() == expected


def test_decoder_plugins_are_added_once_without_pydicom_private_lists(monkeypatch):
    from pydicom.pixels.decoders import JPEGExtended12BitDecoder as dec

    from pacsd.imaging import jpeg12
    jpeg12.register()
    before = dec.available_plugins
    monkeypatch.setattr(dec, "_available", UserDict(dec._available))   # no longer a dict
    compat_pydicom.PLUGINS.reset()
    assert not compat_pydicom.PLUGINS.fits
    jpeg12.register()   # pydicom refuses the second add; that is fine
    assert dec.available_plugins == before


UIDS = ["1.2.840.10008.1.2", "1.2.03", "1.2.3\n", "", "1." * 40, "1.2.abc", " 1.2", "0.0",
        b"1.2.3", b"1.2.x"]


def _uid_answers() -> list:
    from pydicom import valuerep
    from pydicom.uid import UID
    return ([valuerep.VALIDATORS["UI"]("UI", v) for v in UIDS]
            + [UID(v).is_valid for v in UIDS if isinstance(v, str)])


def test_remembered_uid_checks_answer_as_pydicom_and_still_warn(monkeypatch):
    from pydicom import valuerep
    from pydicom.uid import UID
    monkeypatch.setitem(valuerep.VALIDATORS, "UI", valuerep.VALIDATORS["UI"])
    monkeypatch.setattr(UID, "is_valid", UID.__dict__["is_valid"])
    original = getattr(valuerep.VALIDATORS["UI"], "pacsd_original", None)
    if original is not None:   # installed earlier in this process: start from pydicom's own
        valuerep.VALIDATORS["UI"] = original
        UID.is_valid = property(UID.__dict__["is_valid"].fget.pacsd_original)
    expected = _uid_answers()
    assert expected[0] == (True, "") and not all(ok for ok, _ in expected[:10])
    assert compat_pydicom.remember_uid_checks() and compat_pydicom.remember_uid_checks()
    assert hasattr(valuerep.VALIDATORS["UI"], "pacsd_original")
    assert not hasattr(valuerep.VALIDATORS["UI"].pacsd_original, "pacsd_original")  # once
    assert _uid_answers() == expected
    assert _uid_answers() == expected   # the second time from the memo
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        UID("1.2.abc")
    assert compat_pydicom.UID_CHECKS.check().ok   # the probe looks at pydicom's own


def test_uid_checks_are_pydicom_own_when_the_memo_no_longer_fits(monkeypatch):
    from pydicom import valuerep
    monkeypatch.setitem(valuerep.VALIDATORS, "UI", getattr(
        valuerep.VALIDATORS["UI"], "pacsd_original", valuerep.VALIDATORS["UI"]))
    monkeypatch.setattr(valuerep, "VALIDATORS", {**valuerep.VALIDATORS, "UI": None})
    compat_pydicom.UID_CHECKS.reset()
    try:
        assert not compat_pydicom.remember_uid_checks()
        assert valuerep.VALIDATORS["UI"] is None   # left as it was
    finally:
        monkeypatch.undo()
        compat_pydicom.UID_CHECKS.reset()


SERVE_WITH_PYNETDICOM_CHANGED = """
import sys
from pynetdicom.dul import DULServiceProvider
del DULServiceProvider._read_pdu_data   # as if a pynetdicom release had renamed it
from pacsd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_pacsd_serve_refuses_to_start_when_the_pdu_bound_no_longer_fits(tmp_path):
    config = write_config(tmp_path / "pacsd.toml", tmp_path / "data",
                          dicom={"port": 0}, http={"port": 0})
    r = subprocess.run([sys.executable, "-c", SERVE_WITH_PYNETDICOM_CHANGED, "serve",
                        "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert "DULServiceProvider._read_pdu_data (gone)" in r.stderr
    assert "pacsd serve refuses to start" in r.stderr
    assert not list((tmp_path / "data").glob("*.pid"))


def test_config_check_reports_a_library_patch_that_no_longer_fits(tmp_path):
    """`pacsd config --check` says what `pacsd serve` would refuse, before anyone restarts it;
    with the libraries as pinned it passes."""
    config = write_config(tmp_path / "pacsd.toml", tmp_path / "data",
                          dicom={"port": 0}, http={"port": 0})
    ok = subprocess.run([sys.executable, "-m", "pacsd", "config", "--check", "--config",
                         str(config)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "patch" not in ok.stderr
    r = subprocess.run([sys.executable, "-c", SERVE_WITH_PYNETDICOM_CHANGED, "config", "--check",
                        "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_CONFIG, r.stderr
    line = [x for x in r.stderr.splitlines() if "pynetdicom.pdu_size_bound" in x]
    assert len(line) == 1 and "(safety patch)" in line[0], r.stderr
    assert "DULServiceProvider._read_pdu_data (gone)" in line[0]


def test_c_find_answers_are_pydicom_s_when_the_encode_seam_no_longer_fits(monkeypatch,
                                                                           make_server):
    """pynetdicom's C-FIND SCP no longer encoding through its module's `encode`: pacsd's
    handler yields pydicom Datasets again (and the answers are the same)."""
    from conftest import c_find, store_files
    from data import write_series
    from pacsd.dimse import find
    server = make_server()
    for n in range(3):
        paths = write_series(server.cfg.data / f"in{n}", seed=70 + n, images=1, size=8)
        assert store_files(server.dicom_port, paths) == [0]
    status, before = c_find(server.dicom_port, "STUDY", StudyInstanceUID="", PatientName="")
    assert len(before) == 3
    monkeypatch.setattr(compat_pynetdicom.IDENTIFIERS, "_fits", False)
    assert compat_pynetdicom.encoded_identifiers() is False
    yielded = []
    real = find.response
    monkeypatch.setattr(find, "response", lambda *a: yielded.append(1) or real(*a))
    status2, after = c_find(server.dicom_port, "STUDY", StudyInstanceUID="", PatientName="")
    assert status == status2 == 0 and before == after
    assert len(yielded) == len(after)


def test_pynetdicom_standard_log_handlers_only_when_its_debug_lines_are_wanted(monkeypatch):
    from pynetdicom import AE, _config, evt
    from pynetdicom.association import Association
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    try:
        logger.setLevel(logging.INFO)   # setLevel: isEnabledFor's cache is cleared
        compat_pynetdicom.quiet_standard_handlers()
        assert _config.LOG_HANDLER_LEVEL == "none"
        assert not Association(AE(), "requestor").get_handlers(evt.EVT_PDU_RECV)
        logger.setLevel(logging.DEBUG)
        compat_pynetdicom.quiet_standard_handlers()
        assert _config.LOG_HANDLER_LEVEL == "standard"
        assert Association(AE(), "requestor").get_handlers(evt.EVT_PDU_RECV)
    finally:
        logger.setLevel(level)


def test_remembered_pynetdicom_uids_answer_as_pynetdicom_and_still_warn(caplog):
    import importlib
    from pynetdicom import utils
    original = getattr(utils.set_uid, "pacsd_original", utils.set_uid)
    from pydicom.uid import UID
    values = ["1.2.840.10008.1.2", b"1.2.840.10008.1.2.1\x00", "1.2.840.10008.1.2 ", "1.2.03",
              UID("1.2.840.10008.1.2.4.50")]
    expected = [original(v, "x") for v in values]
    assert compat_pynetdicom.remember_uids()
    for name in compat_pynetdicom._SET_UID_USERS:
        assert importlib.import_module(f"pynetdicom.{name}").set_uid is utils.set_uid
    assert utils.set_uid.pacsd_original is original   # installed once
    for _ in range(2):   # the second time from the memo
        assert [utils.set_uid(v, "x") for v in values] == expected
        assert all(type(u).__name__ == "UID" for u in expected)
    private = UID("1.2.3.4")
    private.set_private_encoding(False, True)
    for _ in range(2):   # a UID that carries its own encoding is never shared
        got = utils.set_uid(private, "x")
        assert got == private and got.is_little_endian and not got.is_implicit_VR
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        utils.set_uid("1.2.03", "x")
        utils.set_uid("1.2.03", "x")
    assert sum("Non-conformant" in r.getMessage() for r in caplog.records) == 2
    for _ in range(2):
        with pytest.raises(ValueError):
            utils.set_uid("1." * 40, "x")   # too long; logged by pynetdicom each time
    assert compat_pynetdicom.SET_UID.check().ok   # the probe looks at pynetdicom's own


def test_pynetdicom_uids_are_its_own_when_the_memo_no_longer_fits(monkeypatch):
    from pynetdicom import pdu_items, utils
    if hasattr(utils.set_uid, "pacsd_original"):
        monkeypatch.setattr(utils, "set_uid", utils.set_uid.pacsd_original)
    monkeypatch.delattr(pdu_items, "set_uid")
    compat_pynetdicom.SET_UID.reset()
    try:
        assert not compat_pynetdicom.SET_UID.fits
        assert not compat_pynetdicom.remember_uids()
        assert not hasattr(utils.set_uid, "pacsd_original")
    finally:
        monkeypatch.undo()
        compat_pynetdicom.SET_UID.reset()
