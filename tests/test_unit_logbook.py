"""pacsd.logbook.LibraryNoise: the libraries' warnings and errors are DEBUG in pacsd's log and
absent from the admin page's recent errors, unless they report a fault of pacsd's own code."""

from __future__ import annotations

import logging

import pytest

from pacsd.logbook import LibraryNoise, Logbook


def record(name: str, level: int, msg: str, exc: BaseException | None = None
           ) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(name, level, __file__, 1, msg, None, exc_info)


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - to get its traceback
        return e


def in_pacsd() -> BaseException:
    """An exception raised inside pacsd's own code (as one of its handlers would)."""
    from pacsd.dimse.find import parse_identifier
    try:
        parse_identifier(None, "")   # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("expected an exception")


@pytest.mark.parametrize("rec,kept", [
    # a peer that reset the connection: pynetdicom's ERROR and its traceback
    (record("pynetdicom.dul", logging.ERROR, "[Errno 104] Connection reset by peer",
            raised(ConnectionResetError(104, "Connection reset by peer"))), False),
    (record("pynetdicom.dul", logging.ERROR, "Connection closed before the entire PDU"), False),
    (record("pydicom", logging.WARNING, "Invalid value for VR UI: '1.2.3.abc'"), False),
    (record("py.warnings", logging.WARNING, "valuerep.py:440: UserWarning: ..."), False),
    (record("pylibjpeg.utils", logging.ERROR, "decoder message"), False),
    # pacsd's own faults, reported by pynetdicom: stay errors
    (record("pynetdicom.service_class", logging.ERROR,
            "Exception in handler bound to 'evt.EVT_C_FIND'"), True),
    (record("pynetdicom.service_class", logging.ERROR, "boom", in_pacsd()), True),
    # pacsd's own lines, and names that only look alike
    (record("pacsd.dimse.store", logging.WARNING, "C-STORE from X refused with 0xC000"), True),
    (record("pydicomweb", logging.ERROR, "another library"), True),
])
def test_library_noise_is_demoted_unless_it_is_ours(rec, kept):
    level = rec.levelno
    assert LibraryNoise(logging.INFO).filter(rec) is kept
    assert rec.levelno == (level if kept else logging.DEBUG)
    assert rec.levelname == logging.getLevelName(rec.levelno)


def test_debug_shows_the_demoted_lines():
    rec = record("pynetdicom.dul", logging.ERROR, "Connection closed before the entire PDU")
    assert LibraryNoise("DEBUG").filter(rec) and rec.levelname == "DEBUG"


def test_the_logbook_keeps_no_library_noise():
    book = Logbook()
    logger = logging.getLogger("pydicom.test_unit_logbook")
    ours = logging.getLogger("pacsd.test_unit_logbook")
    logger.propagate = ours.propagate = False
    logger.addHandler(book)
    ours.addHandler(book)
    try:
        logger.warning("Invalid value for VR UI: '1.2.3.abc'")
        ours.warning("C-STORE from X refused with 0xC000: cannot parse the data set")
    finally:
        logger.removeHandler(book)
        ours.removeHandler(book)
    assert [e.logger for e in book.recent()] == ["pacsd.test_unit_logbook"]
