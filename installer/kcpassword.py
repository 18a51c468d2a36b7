"""/etc/kcpassword, where macOS keeps the automatic log-in password: XOR with a fixed 11-byte key,
zero-padded to a multiple of 12 bytes, with 12 more when it already is one (macOS 13 and later
reject other lengths). An obfuscation, not encryption: the file is root-only (0600)."""

from __future__ import annotations

KEY = bytes((0x7D, 0x89, 0x52, 0x23, 0xD2, 0xBC, 0xDD, 0xEA, 0xA3, 0xB9, 0x1F))


def encode(password: str) -> bytes:
    raw = password.encode("utf-8")
    padded = raw + bytes(12 - len(raw) % 12)
    return bytes(b ^ KEY[i % len(KEY)] for i, b in enumerate(padded))


def decode(data: bytes) -> str:
    raw = bytes(b ^ KEY[i % len(KEY)] for i, b in enumerate(data))
    return raw.split(b"\0", 1)[0].decode("utf-8")
