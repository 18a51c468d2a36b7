"""The IT person's first day on the command line (issue 19): the README's server and every other
command on one data folder, each saying which folder and server it talks to; the README's two
commands side by side (their own venvs, no test needing a default port); `config --list` with
the values in effect; help texts; a refused echo in plain words."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

from conftest import LOCAL, Process, free_port, pacsd_cmd, terminate, write_config
from data import write_series
from test_docs import quick_start_commands

ROOT = Path(__file__).parent.parent
DEFAULT_PORTS = ("11112", "8080")


def first_day_env(home: Path, **extra: str) -> dict[str, str]:
    """A new user's shell: no PACSD_* of ours, a HOME of its own; the server's ports left to
    the system (never the defaults: a real server may hold them beside the tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSD_")}
    return {**env, "HOME": str(home), "PACSD_DICOM_PORT": "0", "PACSD_HTTP_PORT": "0",
            "PACSD_DICOM_BIND": LOCAL, **extra}


def run(*args: str, cwd: Path, env: dict[str, str], timeout: float = 60
        ) -> subprocess.CompletedProcess:
    return subprocess.run(pacsd_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def start(args: list[str], data: Path, cwd: Path, env: dict[str, str], log: Path) -> Process:
    with open(log, "ab") as out:
        proc = subprocess.Popen(pacsd_cmd("serve", *args), cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    p = Process(proc, data, log)
    try:
        return p.wait_ready(60)
    except BaseException:
        terminate(proc)
        raise


def first_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.splitlines()
    assert lines and lines[0].startswith("pacsd: data folder "), r.stderr
    return lines[0]


# --- 1. one data folder for every command -----------------------------------------------------

def test_the_readme_server_and_every_other_command_share_one_data_folder(tmp_path: Path):
    """The README's `pacsd serve`, as written, started in the clone; then `status`, `import`,
    `nodes`, `queue` and `config` from another folder without --data: the same archive, and
    each says first which folder and which server."""
    serve = quick_start_commands()[0]
    args = shlex.split(serve.split("pacsd serve", 1)[1])
    clone, home, elsewhere = tmp_path / "clone", tmp_path / "home", tmp_path / "elsewhere"
    for d in (clone, home, elsewhere):
        d.mkdir()
    given = args[args.index("--data") + 1] if "--data" in args else None
    data = (clone / given).resolve() if given else home / "pacsd-data"
    env = first_day_env(home)
    p = start(args, data, clone, env, tmp_path / "serve.log")
    try:
        pid = p.proc.pid
        status = run("status", "--json", cwd=elsewhere, env=env)
        assert status.returncode == 0, (status.stdout, status.stderr)
        report = json.loads(status.stdout)
        assert (report["running"], report["pid"], report["data"]) == (True, pid, str(data))
        assert str(data) in first_line(status)

        images = write_series(tmp_path / "incoming", images=3, size=64)
        imported = run("import", str(tmp_path / "incoming"), cwd=elsewhere, env=env)
        assert imported.returncode == 0, imported.stderr
        assert imported.stdout.strip() == "imported 3 file(s), 0 duplicate(s), 0 refused"
        line = first_line(imported)
        assert str(data) in line and f"server running (pid {pid})" in line, line
        assert f"on DICOM port {p.port}" in line, line

        # What was imported is in the archive the server serves (its index counts them).
        report = json.loads(run("status", "--json", cwd=elsewhere, env=env).stdout)
        assert report["index"]["instances"] == len(images), report

        for command in (["nodes"], ["queue"], ["config"], ["doctor", "--timeout", "2"]):
            r = run(*command, cwd=elsewhere, env=env)
            line = first_line(r)
            assert str(data) in line and f"server running (pid {pid})" in line, (command, line)
    finally:
        assert p.stop() == 0, p.output()


def test_a_folder_given_once_is_found_and_a_stray_one_is_pointed_out(tmp_path: Path):
    """A server started with --data ./pacsd-data (the old quick start): a command run beside
    it, without --data, names the folder it uses and points at ./pacsd-data; PACSD_DATA (and
    --data) still choose it."""
    clone, home = tmp_path / "clone", tmp_path / "home"
    clone.mkdir()
    home.mkdir()
    env = first_day_env(home)
    data = clone / "pacsd-data"
    p = start(["--data", "./pacsd-data"], data, clone, env, tmp_path / "serve.log")
    try:
        r = run("status", cwd=clone, env=env)
        assert r.returncode == 3, r.stdout
        lines = r.stderr.splitlines()
        assert str(home / "pacsd-data") in lines[0] and "(the default)" in lines[0], r.stderr
        assert lines[1] == (f"pacsd: note: {data} here is another pacsd data folder; to use it, "
                            f"pass --data {data} or set PACSD_DATA={data}"), r.stderr
        for how in ({"PACSD_DATA": "pacsd-data"}, {"PACSD_SERVER_DATA": str(data)}):
            r = run("status", cwd=clone, env={**env, **how})
            assert r.returncode == 0, (how, r.stdout, r.stderr)
            assert len(r.stderr.splitlines()) == 1 and str(data) in r.stderr, r.stderr
        r = run("nodes", "--data", "pacsd-data", cwd=clone, env=env)
        assert r.returncode == 0 and f"server running (pid {p.proc.pid})" in first_line(r)
    finally:
        assert p.stop() == 0, p.output()


# --- 2. the README's two commands side by side ------------------------------------------------

def venv_of(command: str) -> str:
    found = re.search(r"python3 -m venv (\S+)", command)
    assert found, command
    return found.group(1)


def test_the_readme_commands_have_their_own_venvs():
    """The server's venv is not the tests' one, and the server command installs nothing into
    the tests' venv (or the reverse): one reinstalled under the other made the pages 404."""
    serve, test = quick_start_commands()
    mine, theirs = venv_of(serve), venv_of(test)
    assert mine != theirs, (serve, test)
    assert f"{theirs}/" not in serve and f"{mine}/" not in test, (serve, test)
    assert f"{mine}/bin/pacsd serve" in serve and f"{theirs}/bin/pytest" in test


def test_no_test_binds_a_default_port(tmp_path: Path):
    """A test that makes something listen on 11112 or 8080 fails beside a running server (the
    README's): every server under test is on port 0, and no test asks for a default port as a
    listening one (a peer's port, a message or a URL may name them)."""
    listening = re.compile(r"\.bind\(|--dicom-port|--http-port|PACSD_DICOM_PORT|PACSD_HTTP_PORT"
                           r"|(dicom|http)\s*=\s*\{[^}]*\"port\"")
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(rf"\b{port}\b", line) for port in DEFAULT_PORTS) \
                    and listening.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
    # The servers the tests start: conftest's config puts both listeners on port 0.
    body = write_config(tmp_path / "c.toml", tmp_path / "d", qr_clients=False).read_text()
    assert body.count("port = 0") == 2, body


# --- 5. command line polish -------------------------------------------------------------------

def test_config_list_shows_the_values_in_effect_and_where_each_comes_from(tmp_path: Path):
    cfg = tmp_path / "pacsd.toml"
    cfg.write_text(f'[server]\ndata = "{tmp_path / "d"}"\n[dicom]\nport = 104\naet = "FILEAET"\n')
    env = first_day_env(tmp_path, PACSD_DICOM_AET="ENVAET", PACSD_CONFIG=str(cfg))
    del env["PACSD_DICOM_PORT"]
    r = run("config", "--list", "--data", str(tmp_path / "flag"), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"# the values in effect; config file: {cfg}"
    for expected in (f'data = "{tmp_path / "flag"}"  # the command line (--data)',
                     f"port = 104  # {cfg}",
                     'aet = "ENVAET"  # $PACSD_DICOM_AET',
                     "port = 0  # $PACSD_HTTP_PORT",
                     "max_associations = 64  # default",
                     f'path = "{tmp_path / "flag" / "storage"}"  # default: in the data folder',
                     '[dicom]', '[http]'):
        assert expected in lines, (expected, r.stdout)
    assert str(tmp_path / "flag") in first_line(r)


def test_every_option_has_a_whole_help_text():
    """Every option and argument of every subcommand says what it does, in whole sentences (a
    setting's help cut at its first full stop, never inside "e.g." or "PS3.5 A.5")."""
    from pacsd import config
    from pacsd.cli import build_parser
    from pacsd.cli.common import _flag_help

    def parsers(p: argparse.ArgumentParser, name: str):
        yield name, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, sp in action.choices.items():
                    yield from parsers(sp, f"{name} {sub}")

    missing = []
    for name, p in parsers(build_parser(), "pacsd"):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
    admin = [a.help for name, p in parsers(build_parser(), "pacsd") if name == "pacsd passwd"
             for a in p._actions if "--admin" in a.option_strings][0]
    assert "administrator" in admin and "admin page" in admin, admin
    assert _flag_help("Up to 4 MB, e.g. a CT slice (PS3.5 A.5) here. More.") == \
        "up to 4 MB, e.g. a CT slice (PS3.5 A.5) here"
    for s in config.SETTINGS:
        if s.cli:
            shown = _flag_help(s.help)
            assert s.help.lower().startswith(shown.lower()), (s.cli, shown)
            assert not re.search(r"\b(e\.g|i\.e|PS\d\.\d+)$", shown), (s.cli, shown)


def test_an_echo_to_nothing_says_nothing_listens(tmp_path: Path):
    port = free_port()   # nothing listens there
    cfg = write_config(tmp_path / "pacsd.toml", tmp_path / "d", qr_clients=False,
                       nodes=[{"name": "ghost", "aet": "GHOST", "host": LOCAL, "port": port}])
    r = run("nodes", "--echo", "--config", str(cfg), cwd=tmp_path, env=first_day_env(tmp_path))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"nothing listens on {LOCAL}:{port} (connection refused)" in r.stdout, r.stdout
    assert "did not accept" not in r.stdout, r.stdout
