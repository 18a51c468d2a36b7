"""Which data folder, config file and server a command talks to: the one line every command
that reads the configuration says first (on stderr, so that its output stays as it was).

Every command resolves the data folder the same way (`--data`, else $PACSD_DATA, else the
config file's [server] data, else DEFAULT_DATA, ~/pacsd-data): a server started with
`pacsd serve` is found by `pacsd status`, `import`, `nodes` from any folder, without --data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pacsd.config import Config
from pacsd.config.sections import DEFAULT_DATA

__all__ = ["describe", "running_server", "server", "stray_data_folder"]

# What marks a folder as a pacsd data folder (for the hint about ./pacsd-data below).
_MARKS = ("pacsd.toml", "index.sqlite3", "pacsd.json", "pacsd.pid")


def running_server(cfg: Config) -> dict[str, Any] | None:
    """pacsd.json of the server using this data folder, when its process is alive."""
    try:
        run = json.loads(cfg.runfile.read_text())
        pid = int(run["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:   # alive, run by another user (the service's account)
        pass
    return run if isinstance(run, dict) else None


def server(cfg: Config) -> str:
    """The server running on this data folder, in words."""
    run = running_server(cfg)
    if run is None:
        if not os.access(cfg.data, os.R_OK | os.X_OK) and cfg.data.exists():
            return (f"whether a server runs on it is unknown: {cfg.data} may not be read by "
                    "this user (the service's own account or root may)")
        return "no server running on it"
    host = run.get("http_bind") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    host = f"[{host}]" if ":" in host else host
    return (f"server running (pid {run['pid']}): {run.get('aet')} on DICOM port "
            f"{run.get('dicom_port')}, {run.get('http_scheme', 'http')}://{host}:"
            f"{run.get('http_port')}/app/")


def stray_data_folder(cfg: Config, cwd: Path | None = None) -> Path | None:
    """./pacsd-data, when it is a pacsd data folder and not the one in use (the quick start of
    pacsd 0.x passed --data ./pacsd-data): the command is then looking at another archive."""
    here = (cwd or Path.cwd()) / "pacsd-data"
    try:
        if here.resolve() == cfg.data.resolve() or not here.is_dir():
            return None
        return here if any((here / m).exists() for m in _MARKS) else None
    except OSError:
        return None


def describe(cfg: Config, with_server: bool = True) -> str:
    """"data folder D (config F); server ..." for the line a command starts with."""
    data = str(cfg.data)
    if cfg.data == Path(DEFAULT_DATA).expanduser():
        data += " (the default)"
    elif not cfg.data.exists():
        data += " (not created yet)"
    config = cfg.source if cfg.source != "defaults" else "none, the defaults"
    text = f"data folder {data}, config file {config}"
    if with_server:
        text += f"; {server(cfg)}"
    stray = stray_data_folder(cfg)
    if stray is not None:
        text += (f"\npacsd: note: {stray} here is another pacsd data folder; to use it, pass "
                 f"--data {stray} or set PACSD_DATA={stray}")
    return text
