"""Verification SOP Class (PS3.4 Annex A): C-ECHO."""

from __future__ import annotations

import logging

from pynetdicom.events import Event

from pacsd.dicom_status import SUCCESS

log = logging.getLogger(__name__)


def handle_echo(event: Event) -> int:
    log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return SUCCESS
