"""Errors that carry the answer they deserve: a DICOM status, an HTTP status, an exit code.

Front ends turn these into responses in one place each; nothing else maps errors to codes.
DICOM statuses are from PS3.4 Annex B (Storage) and C (Query/Retrieve) and PS3.7 Annex C, by
name (pacsd.dicom_status).
"""

from __future__ import annotations

from pacsd.dicom_status import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    DATA_SET_TOO_LARGE,
    DUPLICATE_SOP_INSTANCE,
    OUT_OF_RESOURCES,
    PATIENT_MISMATCH,
    PROCESSING_FAILURE,
    STUDY_MISMATCH,
)

# Exit codes of `pacsd` (sysexits.h values, so that launchd/systemd units can stop a restart loop
# on a configuration error: RestartPreventExitStatus=78 73).
EXIT_OK = 0
EXIT_FAILURE = 1          # unexpected error (a bug): restarting may help
EXIT_USAGE = 2            # bad command line (argparse)
EXIT_UNAVAILABLE = 69     # a port is in use or cannot be bound
EXIT_SOFTWARE = 70        # internal error at start-up (index cannot be opened or migrated)
EXIT_CANTCREAT = 73       # a folder is missing or not writable
EXIT_TEMPFAIL = 75        # another pacsd holds this data folder
EXIT_CONFIG = 78          # the configuration is invalid


class PacsError(Exception):
    """Base class. `dicom_status`, `http_status` and `exit_code` say how each front end answers."""

    dicom_status = PROCESSING_FAILURE  # PS3.7 C.4
    http_status = 500
    exit_code = EXIT_FAILURE
    # False: the condition is logged once when it begins and once when it ends (where it
    # arises), so front ends log each request it refuses at DEBUG only (no log flood).
    log_each = True


# --- start-up ---------------------------------------------------------------------------------

class ConfigError(PacsError):
    exit_code = EXIT_CONFIG


class PortInUse(PacsError):
    exit_code = EXIT_UNAVAILABLE


class FolderNotWritable(PacsError):
    exit_code = EXIT_CANTCREAT


class AlreadyRunning(PacsError):
    exit_code = EXIT_TEMPFAIL


class WorkerFailed(PacsError):
    """A DICOM worker process (pacsd.daemon.workers) could not start: what it said."""


class LibraryMismatch(PacsError):
    """An installed library (pynetdicom, pydicom, cheroot) no longer fits a safety patch of
    pacsd.compat: restarting will not help, installing the pinned version will."""

    exit_code = EXIT_CONFIG


class IndexUnavailable(PacsError):
    """The index cannot be opened, or a write to it failed."""

    exit_code = EXIT_SOFTWARE
    dicom_status = PROCESSING_FAILURE
    http_status = 503


# --- storing ----------------------------------------------------------------------------------

class InvalidDataset(PacsError):
    """Unparseable data set, missing or malformed UIDs (PS3.4 B.2.3: Cannot understand)."""

    dicom_status = CANNOT_UNDERSTAND
    http_status = 400


class SOPClassMismatch(InvalidDataset):
    """The data set's SOP Class differs from the request's (PS3.4 B.2.3: 0xA900)."""

    dicom_status = DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    http_status = 409


class StudyMismatch(InvalidDataset):
    """The instance belongs to another study than the one the request names (STOW-RS to
    /studies/{uid}); 0xC409 is a code of ours in the Cxxx range that PS3.18 Annex I leaves to
    the implementation."""

    dicom_status = STUDY_MISMATCH
    http_status = 409


class DataSetTooLarge(InvalidDataset):
    """A data set beyond this server's limits: it inflates to more than [dicom]
    max_inflated_mb, or declares more pixels than [dicom] max_frame_pixels / max_pixel_mb
    (pacsd.imaging.bounds). Refused at ingest with 0xC422, a code of ours in the Cxxx range (PS3.4 B.2.3:
    Cannot understand; not A7xx, Out of Resources, which invites a retry); a stored one is not
    decoded: 422 (the request is understood, this object cannot be processed; 413 would blame a
    request body), and it can still be retrieved as stored."""

    dicom_status = DATA_SET_TOO_LARGE
    http_status = 422


class OutOfResources(PacsError):
    """Disk full or similar (PS3.4 B.2.3: Refused, Out of Resources)."""

    dicom_status = OUT_OF_RESOURCES
    http_status = 507


class StillWriting(PacsError):
    """A re-sent instance whose first copy is still being written (its row committed, its file
    not yet in place) for longer than a healthy disk takes: refused, to be sent again, rather
    than acknowledged on the strength of a file that may never land."""

    dicom_status = OUT_OF_RESOURCES
    http_status = 503


class StorageFull(OutOfResources):
    """The storage volume is below [storage] min_free_mb, or really full (ENOSPC/EDQUOT)."""

    log_each = False


class IndexFull(OutOfResources):
    """The index's own volume is full (SQLite: SQLITE_FULL; PostgreSQL: SQLSTATE 53100): no
    row can be committed, so nothing is stored (PS3.4 B.2.3: 0xA700). A restart cannot help;
    /testdbalive says so (507) and the watchdog does not kill for it."""

    log_each = False   # pacsd.index logs once when it begins and once when it ends


# --- patient safety on ingest ------------------------------------------------------------------

class PatientMismatch(InvalidDataset):
    """The instance names a study (or series) that the index files under another patient (or
    study): storing it would file one patient's image under another's. Refused by default
    ([storage] patient_mismatch = "refuse"). 0xC40A: in the Cxxx (Error: Cannot understand)
    range that PS3.4 B.2.3 leaves to the implementation, beside StudyMismatch's 0xC409: a
    failure a modality does not retry on its own (dcm4chee-arc uses 0xA778, in the A7xx
    "Out of Resources" range, which senders retry as if the condition would pass)."""

    dicom_status = PATIENT_MISMATCH
    http_status = 409
    comment = "study of another patient in this archive"   # Error Comment (LO, 64 chars)


class ContentConflict(PacsError):
    """A SOP Instance UID that is stored here came again with other content. PS3.7 C.4
    0x0111 (Duplicate SOP Instance): the UID is taken; the sender keeps its copy (a failure,
    never a Success that storage commitment would later vouch for). pacsd keeps the new bytes
    aside all the same (STORAGE/.conflicts), so nothing handed over is lost."""

    dicom_status = DUPLICATE_SOP_INSTANCE
    http_status = 409
    comment = "SOP Instance UID stored here with other content"


# --- sending ----------------------------------------------------------------------------------

class TranscodeError(PacsError, ValueError):
    """A stored file that cannot be sent in any syntax the peer accepted (pacsd.imaging.transcode):
    unreadable, or no decoder or encoder here makes one of them from it. A failed sub-operation
    of C-GET / C-MOVE or of a send (PS3.7 C.4: Processing failure); over HTTP 406, as when a
    client accepts none of the syntaxes an instance is stored in (PS3.18 8.7). Still a ValueError,
    as it was, for callers that catch those."""

    dicom_status = PROCESSING_FAILURE
    http_status = 406


class DamagedFile(PacsError):
    """A stored file was found missing or changed since it was stored (pacsd.storage.integrity):
    it is not sent as if it were good; a C-GET or C-MOVE sub-operation for it fails, and WADO
    answers 500 for it."""

    dicom_status = PROCESSING_FAILURE
    http_status = 500
