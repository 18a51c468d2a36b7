"""Steps both OSes take: folders, the config file (with its one-time admin password), the
manifest, the checks before apply, and the purge of an uninstall."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pacsd_installer import checks
from pacsd_installer.layout import Layout, Options, config_text, python_readable_by_others
from pacsd_installer.system import Host, InstallError, Plan, ensure_dir, ensure_file, remove_path

from pacsd.config import Config, ConfigError, load

Ids = Callable[[], "tuple[int, int] | None"]


@dataclass
class Secret:
    """The administrator password of a new config, shown once after apply."""
    password: str = ""


def read_config(host: Host, layout: Layout, text: str | None = None) -> Config:
    """The installed config (paths are the installed system's), or `text` when it is new."""
    try:
        if text is None:
            return load(host.path(layout.config), env={})
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write(text)
            f.flush()
            return load(Path(f.name), env={})
    except ConfigError as e:
        raise InstallError(f"the config file {layout.config} is not valid: {e}") from None


def config_step(plan: Plan, host: Host, layout: Layout, opts: Options, ids: Ids, owner: str,
                secret: Secret) -> Config:
    """Write the config on the first install only: later, it is the IT person's file."""
    ensure_dir(plan, host, PurePosixPath(layout.config_dir), 0o750, ids, owner)
    if host.path(layout.config).exists():
        plan.notes.append(f"kept the config file {layout.config} as it is")
        return read_config(host, layout)
    if opts.action == "plan":   # nothing is written: no password, and no need of pacsd.web
        hashed = PLAN_HASH
    else:
        from pacsd.web.auth import hash_password
        secret.password = secrets.token_urlsafe(12)
        hashed = hash_password(secret.password)
    text = config_text(layout, opts, hashed)
    ensure_file(plan, host, layout.config, text.encode(), 0o640, ids, owner,
                why="with a new administrator 'admin' (password shown once, after apply)")
    return read_config(host, layout, text)


# The administrator's password hash in the config a plan shows: made, with the password, only
# by apply (a plan writes nothing and shows no password).
PLAN_HASH = "pbkdf2_sha256$0$made-by-apply$"


def log_dirs(cfg: Config) -> list[str]:
    return [str(p.parent) for p in (cfg.log_path, cfg.watchdog_log_path) if p is not None]


def folders(plan: Plan, host: Host, layout: Layout, cfg: Config, service_ids: Ids) -> list[str]:
    """The service's own folders (data, storage, logs): created, and returned."""
    owner = f"{layout.user}:{layout.group}"
    mine = list(dict.fromkeys([str(cfg.data), str(cfg.storage_path), *log_dirs(cfg)]))
    for folder in mine:
        ensure_dir(plan, host, PurePosixPath(folder), 0o750, service_ids, owner)
    return mine


def before_apply(host: Host, layout: Layout, opts: Options, cfg: Config, running: bool,
                 plan: Plan | None = None) -> None:
    """Refuse early, with the reason, what would fail later. For `plan` (given `plan`), a port
    in use is a warning under the plan instead: the plan is shown whatever the ports."""
    for folder in dict.fromkeys([cfg.data, cfg.storage_path]):
        checks.data_folder(host, PurePosixPath(folder), opts.min_free_gb)
    if not running:   # our own pacsd holds them when it runs
        for bind, port, what in ((cfg.dicom_bind, cfg.dicom_port, "DICOM"),
                                 (cfg.http_bind, cfg.http_port, "HTTP")):
            if opts.action != "plan":
                checks.port_free(bind, port, what)
            else:   # looked at without binding it: a server starting meanwhile still gets it
                taken = checks.port_in_use(bind, port, what)
                if taken and plan is not None:
                    plan.warnings.append(f"{taken}: apply would refuse until it is free")
    if not host.staging and layout.mode == "daemon":
        why = python_readable_by_others(layout.python)
        if why:
            raise InstallError(why)


def manifest_step(plan: Plan, host: Host, layout: Layout, root_ids: Ids) -> None:
    ensure_file(plan, host, layout.manifest, layout.manifest_json(), 0o644, root_ids, "root")


def purge_or_keep(plan: Plan, host: Host, layout: Layout, purge: bool) -> None:
    try:
        cfg: Config | None = read_config(host, layout)
    except InstallError:
        cfg = None
    kept = [layout.data] + ([str(cfg.data), str(cfg.storage_path)] if cfg else [])
    if not purge:
        plan.notes.append(f"kept the images, the index and the config ({', '.join(dict.fromkeys(kept))}, "
                          f"{layout.config}); `uninstall --purge` removes them")
        return
    logs = log_dirs(cfg) if cfg else [layout.log_dir]
    folders = [PurePosixPath(f) for f in dict.fromkeys([*kept, *logs, layout.config_dir])]
    for folder in folders:   # a folder inside another one goes with it
        if not any(folder != other and folder.is_relative_to(other) for other in folders):
            remove_path(plan, host, folder)
