"""What `[index] url` says, read without opening anything: which database (SQLite or
PostgreSQL), the SQLite file, and the URL as shown in logs and pages (without its secrets).
pacsd.index.backends turns a URL into a peewee database; the configuration validates and
shows URLs through this module, so it need not import the index.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import SplitResult, unquote_plus, urlsplit, urlunsplit

SQLITE, POSTGRESQL = "sqlite", "postgresql"


def kind(url: str) -> str:
    """SQLITE or POSTGRESQL; ValueError for anything else."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite" and url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SQLITE
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(url)
        if not parts.path.strip("/"):
            raise ValueError(f"{redacted(url)!r}: name the database "
                             "(postgresql://USER:PASSWORD@HOST:PORT/DATABASE)")
        return POSTGRESQL
    raise ValueError(f"{redacted(url)!r} is not an index URL: use sqlite:///PATH or "
                     "postgresql://USER:PASSWORD@HOST:PORT/DATABASE")


def sqlite_path(url: str) -> Path:
    return Path(url[len("sqlite:///"):])


# libpq connection parameters (PostgreSQL docs, 34.1.2) that hold secrets, when given in the
# URL's query string (postgresql://u@h/db?password=...).
_SECRET_PARAMS = ("password", "sslpassword")


def redacted(url: str) -> str:
    """The URL without its secrets (the password in USER:PASSWORD@, and ?password= or
    ?sslpassword= in the query), for logs, status pages and command output: the one place
    that says how an index URL is shown."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if password is not None:
        user, _, host = parts.netloc.rpartition("@")
        parts = SplitResult(parts.scheme, f"{user.split(':', 1)[0]}:***@{host}", parts.path,
                            parts.query, parts.fragment)
    pairs = [pair.partition("=") for pair in parts.query.split("&")] if parts.query else []
    secret = [unquote_plus(k).strip().lower() in _SECRET_PARAMS for k, _, _ in pairs]
    if any(secret):
        query = "&".join(f"{k}=***" if hide else k + eq + v
                         for (k, eq, v), hide in zip(pairs, secret))
        parts = SplitResult(parts.scheme, parts.netloc, parts.path, query, parts.fragment)
    return urlunsplit(parts) if password is not None or any(secret) else url
