"""What pacsd.web.server does with cheroot's internals, each behind one name, each checked.

- `RawStreamReader`: cheroot's socket reader (`cheroot.makefile.StreamReader`, a subclass of
  the pure-Python `_pyio.BufferedReader`) over a raw reader of ours, the one that holds a
  request body to its deadline. StreamReader makes its own raw reader in `__init__`; we
  initialise its `_pyio` base with ours instead. BODY_DEADLINE checks that layout.
- `back_to_selector(server, conn)`: a connection whose request head has not fully arrived goes
  back to cheroot's selector (its ConnectionManager) instead of to a worker. HEAD_GUARD checks
  the connection handling it relies on.

Both are speed patches in this module's sense: when cheroot no longer fits, pacsd.web.server
serves as cheroot does (heads read by the workers; no body deadline), after one WARNING.
"""

from __future__ import annotations

import _pyio
import inspect
from typing import Any

from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.makefile import StreamReader

from pacsd.compat.patch import Misfit, Patch, need_attr, need_params, need_source

DEFAULT_BUFFER_SIZE = _pyio.DEFAULT_BUFFER_SIZE


def _probe_reader() -> None:
    if _pyio.BufferedReader not in StreamReader.__mro__:
        raise Misfit("StreamReader's base (no longer _pyio.BufferedReader)")
    need_params(StreamReader.__init__, ("self", "sock", "mode", "bufsize"), "StreamReader")
    need_source(StreamReader.__init__, ("super().__init__(", "self.bytes_read = 0"),
                "StreamReader.__init__")
    need_params(cheroot_server.HTTPConnection.__init__, ("self", "server", "sock", "makefile"),
                "HTTPConnection")
    need_source(cheroot_server.HTTPConnection.__init__, ("makefile(sock, 'rb'",),
                "HTTPConnection.__init__")
    # What _Gateway.respond reads and sets on the request, as Gateway_10.respond does.
    need_attr(wsgi.Gateway_10, "respond")
    need_source(cheroot_server.HTTPRequest, ("self.chunked_read", "self.inheaders",
                                             "self.sent_headers", "self.outheaders",
                                             "self.close_connection"), "HTTPRequest")
    need_source(wsgi.Gateway, ("self.remaining_bytes_out", "def start_response",
                               "def write"), "wsgi.Gateway")


BODY_DEADLINE = Patch("cheroot.body_deadline", "speed", "cheroot",
                      "request bodies are read under a deadline that grows with what arrived",
                      "request bodies are read as cheroot does, with the per-read timeout only "
                      "(no [http] body_timeout / body_min_rate)", _probe_reader)


class RawStreamReader(StreamReader):
    """cheroot's StreamReader (counting `bytes_read`, `has_data()`) over `raw`."""

    def __init__(self, raw: Any, bufsize: int = DEFAULT_BUFFER_SIZE) -> None:
        # Not StreamReader.__init__, which would make a socket.SocketIO of its own.
        _pyio.BufferedReader.__init__(self, raw, bufsize)
        self.bytes_read = 0


def _probe_selector() -> None:
    server = cheroot_server.HTTPServer
    need_params(server.put_conn, ("self", "conn"), "HTTPServer.put_conn")
    need_params(server.process_conn, ("self", "conn"), "HTTPServer.process_conn")
    need_attr(server, "max_request_header_size")
    need_attr(server, "ConnectionClass")
    need_attr(StreamReader, "has_data")
    # The ConnectionManager hands a connection to process_conn when it is readable and
    # expires it when silent: our head guard waits there.
    from cheroot import connections
    need_source(connections.ConnectionManager, ("def put", "def _expire", "process_conn"),
                "ConnectionManager")
    if not inspect.isfunction(getattr(server, "prepare", None)):
        raise Misfit("HTTPServer.prepare (gone)")


HEAD_GUARD = Patch("cheroot.head_guard", "speed", "cheroot",
                   "a connection reaches a worker only once its whole request head has arrived",
                   "request heads are read by the worker pool as cheroot does (slow clients "
                   "can hold workers)", _probe_selector)


def back_to_selector(server: Any, conn: Any) -> None:
    """Give an idle connection back to cheroot's selector, which hands it to `process_conn`
    again when more bytes arrive and expires it when it stays silent."""
    server.put_conn(conn)


PATCHES: list[Patch] = [HEAD_GUARD, BODY_DEADLINE]
