"""`pacsd retrieve`: query a node, then have it send what matches to the running pacsd."""

from __future__ import annotations

import argparse
import sys
import time

from pacsd.cli.common import open_accounts
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK, PacsError

HELP = "query a node and retrieve what matches into the running pacsd (C-FIND, then C-MOVE)"
LOGGING = "plain"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("node", help="node name or AE title (see `pacsd nodes`)")
    parser.add_argument("--patient-id", metavar="ID", help="the Patient ID (DICOM wildcards allowed)")
    parser.add_argument("--patient-name", metavar="NAME", help="DICOM wildcards allowed: DOE*")
    parser.add_argument("--date", metavar="DATE", help="YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    parser.add_argument("--accession", metavar="NUMBER", help="the Accession Number")
    parser.add_argument("--modality", metavar="CODE",
                        help="only studies with this modality, e.g. CT")
    parser.add_argument("--study-uid", metavar="UID", action="append",
                        help="a Study Instance UID (give it again for several)")
    parser.add_argument("--list", action="store_true", help="only list what matches")


def run(args: argparse.Namespace, cfg: Config) -> int:
    """C-FIND the studies a node holds that match, then C-MOVE each to our own AE title:
    the running pacsd receives them (the node must list us as a destination)."""
    from pacsd.nodes import remote
    with open_accounts(cfg) as accounts:
        node = accounts.node(args.node)
    if node is None:
        print(f"pacsd: no node named {args.node!r} (see `pacsd nodes`)", file=sys.stderr)
        return EXIT_FAILURE
    keys = {"StudyInstanceUID": "\\".join(args.study_uid or []), "PatientName": "",
            "PatientID": "", "StudyDate": "", "AccessionNumber": "", "StudyDescription": "",
            "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": ""}
    for value, key in ((args.patient_name, "PatientName"), (args.patient_id, "PatientID"),
                       (args.date, "StudyDate"), (args.accession, "AccessionNumber"),
                       (args.modality, "ModalitiesInStudy")):
        if value:
            keys[key] = value
    if not any(keys[k] for k in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate",
                                 "AccessionNumber")):
        print("pacsd: say what to retrieve (--patient-id, --patient-name, --date, "
              "--accession or --study-uid)", file=sys.stderr)
        return EXIT_FAILURE
    studies = [m for m in remote.find(cfg, node, "STUDY", keys) if m.get("StudyInstanceUID")]
    print(f"{len(studies)} study(ies) on {node.name} ({node.aet}@{node.host}:{node.port})")
    for m in studies:
        print(f"  {m.get('StudyDate', ''):<8}  {m.get('PatientID', ''):<16} "
              f"{m.get('PatientName', ''):<24} {m.get('AccessionNumber', ''):<12} "
              f"{m.get('StudyDescription', '')}  ({m.get('NumberOfStudyRelatedInstances') or '?'}"
              " instances)")
    if args.list or not studies:
        return EXIT_OK
    failed_studies = 0
    for n, m in enumerate(studies, 1):
        uid = m["StudyInstanceUID"]
        shown = [-1.0]

        def progress(done: int, failed: int, total: int | None) -> None:
            if time.monotonic() - shown[0] >= 1.0:   # a line a second at most
                shown[0] = time.monotonic()
                print(f"  study {n}/{len(studies)}: {done} of {total or '?'} received"
                      + (f", {failed} failed" if failed else ""), flush=True)
        try:
            counts = remote.move_here(cfg, node, {"StudyInstanceUID": uid}, progress=progress)
        except PacsError as e:
            print(f"  study {n}/{len(studies)} {uid}: {e}", file=sys.stderr)
            failed_studies += 1
            continue
        failed_studies += counts["failed"] > 0
        print(f"  study {n}/{len(studies)} {uid}: {counts['completed'] + counts['warning']} "
              f"retrieved, {counts['failed']} failed", flush=True)
    return EXIT_FAILURE if failed_studies else EXIT_OK
