"""Validators of single setting values: each takes the value (already of the setting's type)
and returns it, possibly normalised, or raises ValueError with what a good value looks like."""

from __future__ import annotations

import ipaddress
import re
from typing import Callable

from pacsd.config import index_url as urls


def valid_aet(value: str) -> str:
    """PS3.5 6.2 (AE VR): 1-16 characters of the default repertoire, no backslash or control
    characters, not only spaces."""
    v = value.strip()
    if not v or len(v) > 16 or "\\" in v or any(ord(c) < 0x20 or ord(c) > 0x7E for c in v):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII, no backslash)")
    return v


def port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a TCP port (0-65535; 0 picks a free one)")
    return value


def bind(value: str) -> str:
    if value in ("", "localhost"):
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (0.0.0.0: all interfaces)") from None
    return value


def positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"{value} must be greater than zero")
    return value


def not_negative(value: float) -> float:
    if value < 0:
        raise ValueError(f"{value} must not be negative")
    return value


def in_range(lo: int, hi: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return value
    return check


def aet_list(value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(valid_aet(v) for v in value)


def index_url(value: str) -> str:
    if value:
        urls.kind(value)   # ValueError: what a good URL looks like
    return value


def host_list(value: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for v in value:
        name = v.strip().lower().rstrip(".") if v.strip() != "." else ""
        if name != "*" and not re.fullmatch(r"\.?[a-z0-9_\-.]+|\[?[0-9a-f:.]+\]?", name):
            raise ValueError(f"{v!r} is not a host name, an address, '.domain' or '*'")
        out.append(name.strip("[]"))
    return tuple(out)


def network_list(value: tuple[str, ...]) -> tuple[str, ...]:
    for v in value:
        try:
            ipaddress.ip_network(v.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address or network (10.0.0.0/8)") from None
    return tuple(v.strip() for v in value)


def one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


def log_level(value: str) -> str:
    v = value.upper()
    if v not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"{value!r} is not one of DEBUG, INFO, WARNING, ERROR")
    return v


def web_url(value: str) -> str:
    """An http(s) URL of a web application (no query, no fragment), or empty; without its
    trailing slash."""
    from urllib.parse import urlsplit
    if not value:
        return value
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{value!r} is not an http:// or https:// URL without query "
                         "(e.g. https://ohif.example.org)")
    return value.strip().rstrip("/")


def syslog_target(value: str) -> str:
    """Empty, or HOST:PORT ([v6]:PORT)."""
    v = value.strip()
    if v:
        host, sep, port = v.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not HOST:PORT (e.g. audit.example.org:6514)")
    return v


def ascii_encoding(value: str) -> str:
    """A character encoding Python knows that keeps ASCII as it is ("" allowed): HL7's
    delimiters and MLLP's framing bytes must read the same in it (not UTF-16)."""
    if not value:
        return value
    import codecs
    try:
        name = codecs.lookup(value).name
        same = "MSH|^~\\&".encode(name) == b"MSH|^~\\&"
    except (LookupError, UnicodeError, ValueError):
        raise ValueError(f"{value!r} is not a character encoding (e.g. cp1252, iso-8859-1, "
                         "utf-8)") from None
    if not same:
        raise ValueError(f"{value!r} does not keep ASCII as it is (UTF-16 and UTF-32 cannot "
                         "be framed by MLLP)")
    return value


def normal_address(address: str) -> str:
    """One spelling per IP address, as the peers' addresses are compared with the settings'
    and the nodes': IPv4-mapped IPv6 as IPv4, no zone; anything else as it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
