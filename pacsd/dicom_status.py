"""DICOM status codes by name: the general statuses of PS3.7 Annex C, those of the services
pacsd provides (Storage, PS3.4 B.2.3; Query/Retrieve, C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4;
Storage Commitment, J.3; Modality Performed Procedure Step, F.7.2), and the codes of our own
in the ranges the standard leaves to the implementation.

The standard gives one number several names, one per service (0xA900 is "Data Set does not
match SOP Class" for C-STORE, "Identifier does not match SOP Class" for C-FIND, C-GET and
C-MOVE; 0xC000 "Cannot understand" and "Unable to process"): each is named here as its service
names it, so a handler reads as the standard. pynetdicom.status.Status names four of these
(SUCCESS, CANCEL, PENDING, MOVE_DESTINATION_UNKNOWN); this module is ours so that
pacsd.errors, at the bottom of the imports, can use it without importing pynetdicom.
"""

from __future__ import annotations

# --- general (PS3.7 C.1 - C.4) ----------------------------------------------------------------
SUCCESS = 0x0000
CANCEL = 0xFE00                        # C.3: Cancel (the request was cancelled, C-CANCEL)
PENDING = 0xFF00                       # C.2: Pending (a match, a sub-operation under way)
INVALID_ATTRIBUTE_VALUE = 0x0106       # C.4
PROCESSING_FAILURE = 0x0110            # C.4
DUPLICATE_SOP_INSTANCE = 0x0111        # C.4
NO_SUCH_SOP_INSTANCE = 0x0112          # C.4
INVALID_ARGUMENT_VALUE = 0x0115        # C.4
NO_SUCH_SOP_CLASS = 0x0118             # C.4
CLASS_INSTANCE_CONFLICT = 0x0119       # C.4
NO_SUCH_ACTION = 0x0123                # C.4
NOT_AUTHORIZED = 0x0124                # C.4: Refused: Not Authorized
MISSING_ATTRIBUTE = 0x0120             # C.4
MISSING_ATTRIBUTE_VALUE = 0x0121       # C.4
RESOURCE_LIMITATION = 0x0213           # C.4

# --- Storage (PS3.4 B.2.3) --------------------------------------------------------------------
OUT_OF_RESOURCES = 0xA700              # Refused: Out of Resources (A7xx: senders retry)
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000             # Error: Cannot understand (Cxxx: senders do not retry)
WARNING_COERCION = 0xB000              # Warning: Coercion of Data Elements (stored, with a
#                                        reservation: pacsd.storage.archive.Stored.warning)
WARNING_ELEMENTS_DISCARDED = 0xB006    # Warning: Elements Discarded (stored)
WARNING_DATA_SET_DOES_NOT_MATCH = 0xB007   # Warning: Data Set does not match SOP Class (stored)

# --- Query/Retrieve (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4) ----------------------------------
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000             # Failed: Unable to process (C-FIND: Cxxx)
MOVE_DESTINATION_UNKNOWN = 0xA801      # C-MOVE: Refused: Move Destination unknown
UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702   # C-MOVE / C-GET: Refused: Out of Resources -
#                                        Unable to perform sub-operations (none could be: the
#                                        destination is down or refused every context)
PENDING_OPTIONAL_KEYS = 0xFF01         # C-FIND: Pending, optional keys not supported
WARNING_SUBOPERATIONS_FAILED = 0xB000  # C-MOVE / C-GET: complete, one or more sub-operations failed

# --- Modality Performed Procedure Step (PS3.4 F.7.2.2.2) ------------------------------------
MAY_NO_LONGER_BE_UPDATED = 0x0110      # N-SET: the step is COMPLETED or DISCONTINUED (final)

# --- ours, in the Cxxx range PS3.4 B.2.3 and PS3.18 Annex I leave to the implementation -----
STUDY_MISMATCH = 0xC409                # STOW-RS: the instance is of another study than the URL's
PATIENT_MISMATCH = 0xC40A              # the study is filed under another patient here
DATA_SET_TOO_LARGE = 0xC422            # beyond [dicom] max_inflated_mb / max_frame_pixels


def status_class(status: int) -> str:
    """A response status's class (PS3.7 C.1, C.4): success, warning (0x0001, 0x0107, 0x0116,
    Bxxx), pending (FF00, FF01), cancel (FE00) or failure (everything else)."""
    if status == SUCCESS:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    if status in (PENDING, PENDING_OPTIONAL_KEYS):
        return "pending"
    if status == CANCEL:
        return "cancel"
    return "failure"
