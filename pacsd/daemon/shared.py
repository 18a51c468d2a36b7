"""What the server's process and its DICOM workers both do (pacsd.daemon.server, .worker)."""

from __future__ import annotations

import faulthandler
import socket
import sys
from typing import Any

from pydicom.dataset import Dataset

from pacsd.audit import Auditor
from pacsd.config import Config
from pacsd.plugins.hooks import Hooks
from pacsd.storage.archive import Stored
from pacsd.storage.store import Store


def notify_stored(hooks: Hooks, store: Store, stored: Stored, header: Dataset,
                   calling_aet: str) -> None:
    """Archive.on_stored: the on_instance_stored hooks, with what a plugin usually needs."""
    if stored.duplicate:
        return
    hooks.notify("on_instance_stored", {
        "sop_instance_uid": stored.sop_instance_uid, "study_uid": stored.study_instance_uid,
        "series_uid": stored.series_instance_uid, "calling_aet": calling_aet,
        "path": str(store.path(stored.path)),
        **{key: str(header.get(kw, "") or "") for key, kw in (
            ("sop_class_uid", "SOPClassUID"), ("patient_id", "PatientID"),
            ("patient_name", "PatientName"), ("modality", "Modality"),
            ("study_date", "StudyDate"), ("accession_number", "AccessionNumber"),
            ("study_description", "StudyDescription"))}})


def dump_stacks(*_: Any) -> None:
    """SIGUSR1: every thread's stack to standard error. Run by the interpreter in the main
    thread, holding the GIL: faulthandler's own signal handler walks the other threads while
    they run, and measured here, it crashed the server about one time in six."""
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def new_auditor(cfg: Config, role: str) -> Auditor:
    """This process's audit trail (pacsd.audit): DATA/audit/ROLE.jsonl, the patients of its
    records looked up in the index."""
    from pacsd.query.studies import patients_of_studies
    return Auditor(cfg.audit, cfg.data, role, f"{cfg.dicom_aet}@{socket.gethostname()}",
                   resolve=patients_of_studies)
