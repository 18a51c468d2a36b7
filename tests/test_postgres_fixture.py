"""The PostgreSQL test server itself: it answers, its databases are fresh and separate, they are
dropped even with connections left open, and it listens on 127.0.0.1 only."""

from __future__ import annotations

import os
import tomllib
from urllib.parse import urlsplit

import psycopg
import pytest
from conftest import LOCAL, postgres_database, write_config

EXTERNAL = bool(os.environ.get("PACSD_TEST_POSTGRES"))


def tables(url: str) -> list[str]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        return [r[0] for r in conn.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')")]


def test_server_answers(postgres_server, postgres_url):
    with psycopg.connect(postgres_url, connect_timeout=10) as conn:
        version = conn.execute("SELECT version()").fetchone()[0]
        number = int(conn.execute("SHOW server_version_num").fetchone()[0])
        encoding = conn.execute("SHOW server_encoding").fetchone()[0]
        database = conn.execute("SELECT current_database()").fetchone()[0]
    assert version.startswith("PostgreSQL ")
    assert number >= 130000, "DROP DATABASE ... WITH (FORCE) needs PostgreSQL 13"
    assert encoding == "UTF8"
    assert postgres_url.endswith("/" + database) and database.startswith("pacsd_test_")
    if not EXTERNAL:
        assert postgres_url.startswith(f"postgresql://postgres@{LOCAL}:")


def test_databases_are_fresh_and_separate(make_postgres_url):
    a, b = make_postgres_url(), make_postgres_url()
    assert a != b
    assert tables(a) == [] and tables(b) == []
    with psycopg.connect(a, connect_timeout=10) as conn:
        conn.execute("CREATE TABLE only_in_a (x int)")
    assert tables(a) == ["public.only_in_a"]
    assert tables(b) == []


def test_database_dropped_even_with_a_connection_open(postgres_server):
    with postgres_database(postgres_server) as url:
        lingering = psycopg.connect(url, connect_timeout=10)
        name = lingering.execute("SELECT current_database()").fetchone()[0]
    try:
        with postgres_server.admin() as conn:
            left = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s",
                                (name,)).fetchone()[0]
        assert left == 0
        with pytest.raises(psycopg.OperationalError):
            lingering.execute("SELECT 1")   # FORCE terminated it
    finally:
        lingering.close()


def test_listens_on_loopback_only(postgres_server):
    if postgres_server.folder is None:
        # PACSD_TEST_POSTGRES: a server of someone else's, whose settings are its own; the
        # tests still talk to loopback only.
        assert urlsplit(postgres_server.url).hostname in (LOCAL, "localhost", "::1")
        return
    with postgres_server.admin() as conn:
        listen = conn.execute("SHOW listen_addresses").fetchone()[0]
        sockets = conn.execute("SHOW unix_socket_directories").fetchone()[0]
        server_addr = str(conn.execute("SELECT inet_server_addr()").fetchone()[0])
        max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])
        port = int(conn.execute("SHOW port").fetchone()[0])
    assert listen == LOCAL and server_addr == LOCAL
    assert sockets == str(postgres_server.folder)   # not the system's /var/run/postgresql
    assert port != 5432
    assert max_connections >= 200
    # Another loopback address (all of 127/8 reaches lo on Linux) and IPv6's are refused:
    # a server bound to * or localhost would accept them.
    for host in ("127.0.0.2", "::1"):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host=host, port=port, user="postgres", dbname="postgres",
                            connect_timeout=2).close()


def test_index_url_reaches_the_config_intact(index_url, tmp_path, request):
    """make_server(index={"url": index_url}) writes [index] url = ... that TOML reads back."""
    backend = request.node.callspec.params["index_url"]
    if backend == "sqlite":
        assert index_url == f"sqlite:///{tmp_path}/index.sqlite3"
        assert "postgres_server" not in request.fixturenames   # no PostgreSQL for sqlite runs
    else:
        assert index_url.startswith("postgresql://")
        assert tables(index_url) == []
    cfg = write_config(tmp_path / "pacsd.toml", tmp_path / "data", index={"url": index_url})
    assert tomllib.loads(cfg.read_text())["index"] == {"url": index_url}
