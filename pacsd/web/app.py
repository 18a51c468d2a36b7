"""What every web sub-app starts from: a bottle app whose errors become answers in one place.

`new_app()` installs `errors_plugin`, which turns a `PacsError` into the HTTP status it carries,
and gives the common error codes a plain-text page.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import bottle

from pacsd.errors import PacsError
from pacsd.query import QueryError
from pacsd.web.guard import client_of

log = logging.getLogger(__name__)


def errors_plugin(callback: Callable) -> Callable:
    """Turn our errors into HTTP answers, in one place: each carries its status."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except PacsError as e:
            log.warning("HTTP %s %s from %s: %s", bottle.request.method, bottle.request.path,
                        client_of(bottle.request.environ), e)
            if bottle.request.path.startswith("/api/"):   # the pages read {"error": ...}
                raise bottle.HTTPResponse(json.dumps({"error": str(e)}), e.http_status,
                                          {"Content-Type": "application/json"}) from None
            raise bottle.HTTPError(e.http_status, str(e)) from None
    return wrapper


def new_app() -> bottle.Bottle:
    app = bottle.Bottle(catchall=True)
    app.install(errors_plugin)

    def plain_error(err: bottle.HTTPError) -> str:
        bottle.response.content_type = "text/plain; charset=utf-8"
        return f"{err.status_line}: {err.body}\n"
    for code in (400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 500, 503, 507):
        app.error_handler[code] = plain_error
    return app


def utf8_query() -> Any:
    """The query string's values as text. bottle hands them out as Latin-1, while the page
    sends UTF-8: without this, "Müller" was searched as "MÃ¼ller" and found nothing."""
    try:
        return bottle.request.query.decode()
    except UnicodeDecodeError:
        # A PacsError: the errors plugin answers 400 and logs one line.
        raise QueryError("the query string is not UTF-8") from None
