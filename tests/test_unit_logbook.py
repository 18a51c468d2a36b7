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
    ours = logging.getLogger("pacsd.dimse.test_unit_logbook")   # one whose warnings show
    logger.propagate = ours.propagate = False
    logger.addHandler(book)
    ours.addHandler(book)
    try:
        logger.warning("Invalid value for VR UI: '1.2.3.abc'")
        ours.warning("C-STORE from X refused with 0xC000: cannot parse the data set")
    finally:
        logger.removeHandler(book)
        ours.removeHandler(book)
    assert [e.logger for e in book.recent()] == ["pacsd.dimse.test_unit_logbook"]


# --- what the admin page's "recent errors" shows (issue 19, point 11) ---------------------------

@pytest.mark.parametrize("name,level,shown", [
    ("pacsd.dimse.access", logging.WARNING, True),       # an association refused
    ("pacsd.dimse.retrieve", logging.WARNING, True),     # C-MOVE to an unknown destination
    ("pacsd.nodes.remote", logging.WARNING, True),       # a send that failed
    ("pacsd.nodes.routing.sender", logging.WARNING, True),
    ("pacsd.storage.store", logging.WARNING, True),      # the disk is full
    ("pacsd.index.writer", logging.ERROR, True),         # the index volume is full
    ("pacsd.plugins.webhook", logging.WARNING, True),    # a delivery given up
    ("pacsd.daemon", logging.WARNING, True),             # an unclean stop, a failed health check
    ("pacsd.web.jobs", logging.WARNING, True),           # a retrieve started on a page failed
    ("pacsd.web.auth", logging.WARNING, True),           # password guessing over HTTP Basic
    ("pacsd.web.wado_rs", logging.ERROR, True),          # a stored file unreadable: any error
    ("watchdog.policy", logging.WARNING, True),
    ("pacsd.web.app", logging.WARNING, False),           # a 4xx answer to one request
    ("pacsd.web.guard", logging.WARNING, False),         # a cross-site request refused
    ("pacsd.web.ui", logging.WARNING, False),            # a failed log-in
    ("pacsd.web.admin", logging.WARNING, False),         # the admin page's own changes
    ("pacsd.web.api", logging.WARNING, False),           # a delete, audited in the log file
    ("pacsd.cli.import_", logging.WARNING, False),       # a one-shot command
    ("pacsd.dimse.store", logging.INFO, False),
    ("pacsd.dimse.store", logging.DEBUG, False),         # where patient data may be
    ("pacsd.dimsex", logging.WARNING, False),            # only looks alike
    ("cheroot.error", logging.ERROR, False),             # a library's
    ("peewee", logging.ERROR, False),
])
def test_recent_errors_are_what_an_administrator_acts_on(name, level, shown):
    from pacsd.logbook import for_admin
    assert for_admin(level, name) is shown
    book = Logbook()
    book.handle(record(name, level, "message"))
    assert len(book.recent()) == (1 if shown else 0)


def test_a_library_s_report_of_our_fault_is_shown():
    book = Logbook()
    book.handle(record("pynetdicom.service_class", logging.ERROR, "boom", in_pacsd()))
    book.handle(record("pynetdicom.dul", logging.ERROR, "Connection reset",
                       raised(ConnectionResetError(104, "reset"))))
    assert [e.logger for e in book.recent()] == ["pynetdicom.service_class"]


def test_lines_read_back_from_the_log_file_follow_the_same_rule(tmp_path):
    log = tmp_path / "pacsd.log"
    log.write_text("\n".join([
        "2026-12-07 05:00:00 WARNING pacsd.dimse.access: association from 10.0.0.9 refused: "
        "calling AE title 'X' is not allowed",
        "2026-12-07 05:00:01 WARNING pacsd.web.app: HTTP GET /api/x from 10.0.0.9: not found",
        "2026-12-07 05:00:02 WARNING pacsd.web.ui: failed login for 'bob' from 10.0.0.9",
        "2026-12-07 05:00:03 ERROR   pynetdicom.dul: Connection reset by peer",
        "2026-12-07 05:00:04 INFO    pacsd.dimse.store: stored 1.2.3",
        "2026-12-07 05:00:05 DEBUG   pacsd.dimse.store: C-STORE of DOE^JANE",
        "2026-12-07 05:00:06 ERROR   pacsd.storage.archive: stored file x cannot be read",
    ]) + "\n")
    book = Logbook()
    assert book.preload(log) == 2
    assert [e.logger for e in book.recent()] == ["pacsd.storage.archive", "pacsd.dimse.access"]


def test_a_spell_is_logged_once_for_the_server():
    """pacsd.logbook.Spells: the server's process and each DICOM worker meet a full index on
    their own; one line when it begins, one when the first of them is through."""
    from pacsd.logbook import Spells
    spells = Spells()
    assert spells.change("index-full", True, "server") is True
    assert spells.change("index-full", True, "worker-1") is False
    assert spells.change("index-full", False, "worker-2") is False   # never in it: says nothing
    assert spells.change("index-full", False, "worker-1") is True    # the end, for all
    assert spells.change("index-full", False, "server") is False
    assert spells.change("index-full", True, "worker-2") is True     # a new spell is logged
    spells.forget("worker-2")                                         # it died: over, unsaid
    assert spells.change("index-full", True, "server") is True
