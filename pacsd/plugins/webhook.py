"""POST JSON to a URL when a study is stable and/or an instance is stored.

    [hooks]
    plugins = ["pacsd.plugins.webhook"]
    [plugin.webhook]
    url = "https://automation.example.org/pacs"    # required, http or https
    events = ["study_stable"]                      # and/or "instance_stored"
    secret = "shared secret"                       # optional: signs each body
    timeout = 4.0                                  # seconds for the whole delivery, all tries
    attempts = 3
    [plugin.webhook.headers]                       # optional extra request headers
    Authorization = "Bearer ..."

The body (UTF-8 JSON, Content-Type application/json):

    {"event": "study_stable", "id": "<uuid, the same on every try>", "aet": "PACSD",
     "time": "2024-05-01T12:00:00Z", "data": {...the hook's event...}}

For study_stable, data has study_uid, patient_id, patient_name, study_date, study_time,
accession_number, study_description, modalities, series, instances, calling_aets, ...; for
instance_stored: sop_instance_uid, study_uid, series_uid, sop_class_uid, patient_id, modality,
calling_aet, path, .... Headers X-Pacsd-Event and X-Pacsd-Delivery repeat the event and id;
with a secret, X-Pacsd-Signature is `sha256=` and the hex HMAC-SHA256 of the body's bytes
under that secret (check it on the raw body, before parsing).

Any 2xx answer is success. A connection error, a time-out, 408, 429 or 5xx is retried after
0.25 s, 0.5 s, ... while `timeout` allows; any other answer (redirects included: they are not
followed) is final. Then a WARNING is logged and the event dropped: best-effort, nothing is
queued. Proxies named in the environment (https_proxy, no_proxy) apply.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pacsd import __version__

log = logging.getLogger(__name__)

NAME = "webhook"
EVENTS = ("study_stable", "instance_stored")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_S = 0.25
KNOWN = {"url", "events", "secret", "headers", "timeout", "attempts"}


@dataclass(frozen=True)
class Settings:
    url: str
    events: frozenset[str] = frozenset({"study_stable"})
    secret: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 4.0
    attempts: int = 3
    aet: str = "PACSD"


_settings: Settings | None = None


def parse_settings(raw: dict[str, Any], aet: str = "PACSD") -> Settings:
    """[plugin.webhook] as Settings; ValueError or TypeError says what is wrong (the plugin is
    then left out)."""
    unknown = sorted(set(raw) - KNOWN)
    if unknown:
        raise ValueError(f"[plugin.webhook]: unknown setting(s) {', '.join(unknown)}")
    url = raw.get("url")
    if not isinstance(url, str) or not url:
        raise ValueError("[plugin.webhook] url is required")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"[plugin.webhook] url must be http:// or https:// with a host, not "
                         f"{parts.scheme or 'no scheme'}")
    events = raw.get("events", ["study_stable"])
    if isinstance(events, str):
        events = [events]
    if not isinstance(events, list) or not events or any(e not in EVENTS for e in events):
        raise ValueError(f"[plugin.webhook] events: a list of {', '.join(EVENTS)}")
    secret = raw.get("secret", "")
    headers = raw.get("headers", {})
    if not isinstance(secret, str):
        raise TypeError("[plugin.webhook] secret must be a string")
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and "\n" not in k + v and "\r" not in k + v
            for k, v in headers.items()):
        raise ValueError("[plugin.webhook] headers: a table of name = \"value\" strings")
    timeout, attempts = raw.get("timeout", 4.0), raw.get("attempts", 3)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError("[plugin.webhook] timeout must be a positive number of seconds")
    if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= 20:
        raise ValueError("[plugin.webhook] attempts must be between 1 and 20")
    return Settings(url=url, events=frozenset(events), secret=secret, headers=dict(headers),
                    timeout=float(timeout), attempts=attempts, aet=aet)


def setup(settings: dict[str, Any], context: Any) -> None:
    global _settings
    _settings = parse_settings(settings, str(getattr(context, "aet", "") or "PACSD"))
    parts = urlsplit(_settings.url)
    log.info("webhook: %s to %s://%s%s", ", ".join(sorted(_settings.events)), parts.scheme,
             parts.netloc.rsplit("@", 1)[-1], parts.path)   # no credentials in the log


def on_study_stable(event: dict[str, Any]) -> None:
    _post("study_stable", event)


def on_instance_stored(event: dict[str, Any]) -> None:
    _post("instance_stored", event)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None   # a redirect is answered as it is: an HTTPError with its 3xx status


_opener = urllib.request.build_opener(_NoRedirect())


def _post(name: str, event: dict[str, Any]) -> bool:
    s = _settings
    if s is None or name not in s.events:
        return False
    delivery = str(uuid.uuid4())
    body = json.dumps({"event": name, "id": delivery, "aet": s.aet,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "data": event}, default=str, separators=(",", ":")).encode()
    headers = {**s.headers, "Content-Type": "application/json",
               "User-Agent": f"pacsd/{__version__}", "X-Pacsd-Event": name,
               "X-Pacsd-Delivery": delivery}
    if s.secret:
        headers["X-Pacsd-Signature"] = sign(s.secret, body)
    return deliver(body, headers, s,
                   f"{name} of study {event.get('study_uid', '')} (delivery {delivery})")


def deliver(body: bytes, headers: dict[str, str], s: Settings, what: str) -> bool:
    """POST until a 2xx, at most `s.attempts` tries within `s.timeout` seconds; whether it
    was accepted. Never raises for a network or receiver problem."""
    deadline = time.monotonic() + s.timeout
    delay, problem, tries = BACKOFF_S, "no time to try", 0
    while tries < s.attempts:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        tries += 1
        retry = True
        request = urllib.request.Request(s.url, data=body, headers=headers, method="POST")
        try:
            with _opener.open(request, timeout=left) as response:
                response.read(65536)
                log.debug("webhook: %s accepted (HTTP %d)", what, response.status)
                return True
        except urllib.error.HTTPError as e:
            problem = f"HTTP {e.code} {e.reason}"
            retry = e.code in RETRY_STATUS
            e.close()
        except (urllib.error.URLError, OSError, ValueError) as e:
            problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        wait = min(delay, deadline - time.monotonic())
        if not retry or tries >= s.attempts or wait <= 0:
            break
        log.info("webhook: try %d of %d for %s failed (%s); again in %.2f s", tries,
                 s.attempts, what, problem, wait)
        time.sleep(wait)
        delay *= 2
    log.warning("webhook: %s not delivered after %d tr%s (%s); given up (best-effort: not "
                "queued)", what, tries, "y" if tries == 1 else "ies", problem)
    return False
