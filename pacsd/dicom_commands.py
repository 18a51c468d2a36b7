"""DIMSE command sets read and written by hand (PS3.7 6.3.1, E.1), for the fast lane.

A command set is a few elements of group 0000, always Implicit VR Little Endian. pynetdicom
decodes each one into a pydicom Dataset and encodes each response from one: about a third of a
C-STORE's Python time. Here a request is split into its elements with struct, and a response is
packed from the few values that vary (message ID, status, UIDs, comment).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_FIND_RSP, C_GET_RSP, C_MOVE_RSP = 0x8020, 0x8010, 0x8021
PENDING = 0xFF00
NO_DATA_SET = 0x0101   # (0000,0800) Command Data Set Type: no data set follows

_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_BEING_RESPONDED_TO = 0x0120
_PRIORITY = 0x0700
_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE = 0x1000
_REMAINING, _COMPLETED, _FAILED, _WARNING = 0x1020, 0x1021, 0x1022, 0x1023
_MOVE_ORIGINATOR_AET = 0x1030
_MOVE_ORIGINATOR_ID = 0x1031

# PS3.7 E.1 allows no more than these elements; a command set larger than this is no command.
MAX_COMMAND = 64 << 10

_ELEMENT = struct.Struct("<HHL")


class CommandError(ValueError):
    """Bytes that are no command set (the association is then aborted, PS3.7 D.3.2)."""


@dataclass(frozen=True)
class Command:
    """The fields of a request the fast lane looks at."""

    field: int
    message_id: int
    has_data: bool
    sop_class: str = ""
    sop_instance: str = ""
    priority: int = 0
    move_originator_aet: str = ""
    move_originator_id: int = 0
    responded_to: int = -1   # a response's Message ID Being Responded To
    status: int = -1         # a response's Status
    error_comment: str = ""


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\0 ").strip()


def _us(raw: bytes, tag: int) -> int:
    if len(raw) != 2:
        raise CommandError(f"(0000,{tag:04X}) is {len(raw)} bytes long, not 2")
    return int.from_bytes(raw, "little")


def decode(raw: bytes | bytearray | memoryview) -> Command:
    """The request in `raw`, an encoded command set. CommandError if it is none."""
    if len(raw) > MAX_COMMAND:
        raise CommandError(f"a command set of {len(raw)} bytes")
    values: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if end - offset < 8:
            raise CommandError("a command set that ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(raw, offset)
        offset += 8
        if group != 0:
            raise CommandError(f"element ({group:04X},{element:04X}) in a command set")
        if length > end - offset:
            raise CommandError(f"(0000,{element:04X}) is longer than the command set")
        values[element] = bytes(raw[offset:offset + length])
        offset += length
    if _COMMAND_FIELD not in values:
        raise CommandError("a command set without Command Field")
    return Command(
        field=_us(values[_COMMAND_FIELD], _COMMAND_FIELD),
        # Responses have none (they carry Message ID Being Responded To): -1
        message_id=_us(values[_MESSAGE_ID], _MESSAGE_ID) if _MESSAGE_ID in values else -1,
        has_data=_us(values.get(_DATA_SET_TYPE, b"\x01\x01"), _DATA_SET_TYPE) != NO_DATA_SET,
        sop_class=_text(values.get(_AFFECTED_SOP_CLASS, b"")),
        sop_instance=_text(values.get(_AFFECTED_SOP_INSTANCE, b"")),
        priority=_us(values[_PRIORITY], _PRIORITY) if _PRIORITY in values else 0,
        move_originator_aet=_text(values.get(_MOVE_ORIGINATOR_AET, b"")),
        move_originator_id=(_us(values[_MOVE_ORIGINATOR_ID], _MOVE_ORIGINATOR_ID)
                            if _MOVE_ORIGINATOR_ID in values else 0),
        responded_to=(_us(values[_BEING_RESPONDED_TO], _BEING_RESPONDED_TO)
                      if _BEING_RESPONDED_TO in values else -1),
        status=_us(values[_STATUS], _STATUS) if _STATUS in values else -1,
        error_comment=_text(values.get(_ERROR_COMMENT, b"")))


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0, tag, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _lo(text: str) -> bytes:
    raw = text.encode("ascii", "replace")[:64]
    return raw + b" " if len(raw) % 2 else raw


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "little")


def store_request(message_id: int, sop_class: str, sop_instance: str, priority: int = 0,
                  move_originator_aet: str = "", move_originator_id: int | None = None
                  ) -> bytes:
    """An encoded C-STORE-RQ (PS3.7 9.3.1.1), a data set to follow."""
    body = [_element(_AFFECTED_SOP_CLASS, _ui(sop_class)),
            _element(_COMMAND_FIELD, _u16(C_STORE_RQ)),
            _element(_MESSAGE_ID, _u16(message_id)),
            _element(_PRIORITY, _u16(priority)),
            _element(_DATA_SET_TYPE, _u16(0x0000)),
            _element(_AFFECTED_SOP_INSTANCE, _ui(sop_instance))]
    if move_originator_aet:
        body.append(_element(_MOVE_ORIGINATOR_AET, _ae(move_originator_aet)))
    if move_originator_id is not None:
        body.append(_element(_MOVE_ORIGINATOR_ID, _u16(move_originator_id)))
    rest = b"".join(body)
    return _element(0x0000, len(rest).to_bytes(4, "little")) + rest


def pending(field: int, responded_to: int, sop_class: str, status: int = PENDING,
            counts: tuple[int, int, int, int] | None = None, identifier: bool = False
            ) -> bytes:
    """An encoded pending response (PS3.7 9.3.2.2, 9.3.3.2, 9.3.4.2): a C-FIND-RSP followed
    by its `identifier`, or a C-GET-RSP / C-MOVE-RSP with its sub-operation `counts`
    (remaining, completed, failed, warning), sent after each sub-operation."""
    body = [_element(_AFFECTED_SOP_CLASS, _ui(sop_class)) if sop_class else b"",
            _element(_COMMAND_FIELD, _u16(field)),
            _element(_BEING_RESPONDED_TO, _u16(responded_to)),
            _element(_DATA_SET_TYPE, _u16(0x0000 if identifier else NO_DATA_SET)),
            _element(_STATUS, _u16(status))]
    if counts is not None:
        body += [_element(tag, _u16(n))
                 for tag, n in zip((_REMAINING, _COMPLETED, _FAILED, _WARNING), counts)]
    rest = b"".join(body)
    return _element(0x0000, len(rest).to_bytes(4, "little")) + rest


def _ae(title: str) -> bytes:
    raw = title.strip().encode("ascii", "replace")[:16]
    return raw + b" " if len(raw) % 2 else raw


def response(request: Command, status: int, comment: str = "") -> bytes:
    """The encoded response to a C-STORE-RQ or C-ECHO-RQ (PS3.7 9.3.1.2, 9.3.5.2)."""
    field = C_STORE_RSP if request.field == C_STORE_RQ else C_ECHO_RSP
    body = [_element(_AFFECTED_SOP_CLASS, _ui(request.sop_class)),
            _element(_COMMAND_FIELD, _u16(field)),
            _element(_BEING_RESPONDED_TO, _u16(request.message_id)),
            _element(_DATA_SET_TYPE, _u16(NO_DATA_SET)),
            _element(_STATUS, _u16(status))]
    if comment:
        body.append(_element(_ERROR_COMMENT, _lo(comment)))
    if field == C_STORE_RSP:
        body.append(_element(_AFFECTED_SOP_INSTANCE, _ui(request.sop_instance)))
    rest = b"".join(body)
    return _element(0x0000, len(rest).to_bytes(4, "little")) + rest
