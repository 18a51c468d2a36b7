"""The read layer: every read of the index goes through here.

`matching` turns DICOM query keys (PS3.4 C.2.2.2) into SQL for C-FIND, C-MOVE / C-GET and
QIDO-RS; its names are re-exported here, so callers write `query.find(...)`. `studies` holds the
study list and summaries the pages show; `predicate` the OsiriX predicates of the XML-RPC
methods and their reads. The web side reads the index through these only.
"""

from pacsd.query.matching import (DA, FILLED_ELSEWHERE, IS, KEYS, LEVELS, MODALITIES, MODELS,
                                  PN, RETURN, ST, TM, UID, UNIQUE_KEYS, Key, QueryError, Request,
                                  StoredInstance, condition, fill_dataset, find, glob, instances,
                                  select)

__all__ = ["DA", "FILLED_ELSEWHERE", "IS", "KEYS", "LEVELS", "MODALITIES", "MODELS", "PN",
           "RETURN", "ST", "TM", "UID", "UNIQUE_KEYS", "Key", "QueryError", "Request",
           "StoredInstance", "condition", "fill_dataset", "find", "glob", "instances", "select"]
