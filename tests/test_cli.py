"""`pacsd` as an operator runs it: a subprocess, its exit codes, its messages, its files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from conftest import (LOCAL, associate, free_port, pacsd_cmd, remote_pacsd, serve, terminate,
                      write_config)
from data import write_series

EXIT_CONFIG, EXIT_UNAVAILABLE, EXIT_CANTCREAT, EXIT_TEMPFAIL, EXIT_NOT_RUNNING = 78, 69, 73, 75, 3


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSD_")}
    return {**env, **extra}


def pacsd(*args: str, env: dict[str, str] | None = None, timeout: float = 30
          ) -> subprocess.CompletedProcess:
    return subprocess.run(pacsd_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=clean_env(**(env or {})), stdin=subprocess.DEVNULL)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("pacsd: "), lines[0]
    return lines[0]


def last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    return lines[-1]


def config_values(stdout: str) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in stdout.splitlines() if " = " in line)


@pytest.fixture(autouse=True)
def no_pacsd_env(monkeypatch):
    # `serve` (conftest) inherits the environment: keep a developer's PACSD_* out of it.
    for k in list(os.environ):
        if k.startswith("PACSD_"):
            monkeypatch.delenv(k)


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write_config(tmp_path / "pacsd.toml", tmp_path / "data")


# --- pacsd config -----------------------------------------------------------------------------

def test_config_check_accepts_a_good_file(cfg: Path, tmp_path: Path):
    r = pacsd("config", "--check", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout and "127.0.0.1:0" in r.stdout
    assert str(tmp_path / "data") in r.stdout
    assert r.stderr == ""


@pytest.mark.parametrize("toml, env, words", [
    ("[dicom]\nport = 70000\n", {}, ["port", "70000"]),
    ('[dicom]\naet = "ABCDEFGHIJKLMNOPQ"\n', {}, ["aet", "ABCDEFGHIJKLMNOPQ"]),
    ("[dicom]\nprot = 104\n", {}, ["unknown", "prot"]),
    ("[dicom\nport = 104\n", {}, ["not valid TOML"]),
    ("[dicom]\nport = 104\n", {"PACSD_DICOM_PORT": "abc"}, ["port", "PACSD_DICOM_PORT", "abc"]),
], ids=["port", "aet", "unknown-key", "toml", "env"])
def test_config_check_refuses_with_one_clear_line(tmp_path: Path, toml, env, words):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    r = pacsd("config", "--check", "--config", str(path), env=env)
    assert r.returncode == EXIT_CONFIG, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    for w in words:
        assert w in line, line
    assert r.stdout == ""


def test_config_file_that_does_not_exist(tmp_path: Path):
    r = pacsd("config", "--check", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == EXIT_CONFIG
    assert "does not exist" in one_line(r.stderr)


def test_config_check_reports_every_problem(tmp_path: Path):
    """Two bad values (and a bad environment value): each on its own line, not only the first."""
    path = tmp_path / "bad.toml"
    path.write_text(f'[server]\ndata = "{tmp_path / "data"}"\n'
                    '[dicom]\nport = 70000\naet = "ABCDEFGHIJKLMNOPQ"\n[http]\nthreads = 1\n')
    r = pacsd("config", "--check", "--config", str(path), env={"PACSD_ROUTING_CONCURRENCY": "x"})
    assert r.returncode == EXIT_CONFIG, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 4, r.stderr
    assert all(line.startswith("pacsd: ") for line in lines), lines
    for words, line in zip([("[dicom] port", "70000"), ("[dicom] aet", "ABCDEFGHIJKLMNOPQ"),
                            ("[http] threads", "1"), ("[routing] concurrency",
                                                      "$PACSD_ROUTING_CONCURRENCY")], lines):
        assert all(w in line for w in words), line
    assert r.stdout == ""


def test_config_check_finds_folders_it_cannot_write(tmp_path: Path):
    """A storage folder and a log folder that cannot be created (a regular file where a folder
    should be: root may write anywhere else), beside a bad value: three lines."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = tmp_path / "folders.toml"
    path.write_text(f'[server]\ndata = "{tmp_path / "data"}"\n'
                    f'[storage]\npath = "{blocker / "storage"}"\n'
                    f'[log]\nfile = "{blocker / "logs" / "pacsd.log"}"\n'
                    '[dicom]\nport = -1\n')
    r = pacsd("config", "--check", "--config", str(path))
    assert r.returncode == EXIT_CONFIG, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3, r.stderr
    assert "[dicom] port" in lines[0]
    assert lines[1] == (f"pacsd: [storage] path: {blocker / 'storage'}: cannot be created: "
                        f"{blocker} is not a folder")
    assert lines[2].startswith(f"pacsd: [log] file (its folder): {blocker / 'logs'}: ")
    # The same folders, fixed: OK (the data folder need not exist yet: serve creates it).
    path.write_text(f'[server]\ndata = "{tmp_path / "data"}"\n'
                    f'[storage]\npath = "{tmp_path / "nas" / "storage"}"\n')
    r = pacsd("config", "--check", "--config", str(path))
    assert r.returncode == 0 and "configuration OK" in r.stdout, r.stderr


def test_precedence_file_then_environment(tmp_path: Path):
    cfg = write_config(tmp_path / "pacsd.toml", tmp_path / "data",
                       dicom={"aet": "FILEAE", "port": 1104})
    r = pacsd("config", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    v = config_values(r.stdout)
    assert (v["dicom_aet"], v["dicom_port"]) == ("'FILEAE'", "1104")

    r = pacsd("config", "--config", str(cfg),
              env={"PACSD_DICOM_AET": "ENVAE", "PACSD_DICOM_PORT": "2104"})
    assert r.returncode == 0, r.stderr
    v = config_values(r.stdout)
    assert (v["dicom_aet"], v["dicom_port"]) == ("'ENVAE'", "2104")
    assert v["dicom_bind"] == "'127.0.0.1'"   # untouched keys still come from the file


def test_precedence_command_line_beats_environment(tmp_path: Path, monkeypatch):
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "pacsd.toml", data, dicom={"aet": "FILEAE"})
    monkeypatch.setenv("PACSD_DICOM_AET", "ENVAE")
    monkeypatch.setenv("PACSD_DICOM_PORT", str(free_port()))
    port = free_port()
    with serve(cfg, data, "--aet", "CLIAE", "--dicom-port", str(port)) as p:
        info = json.loads((data / "pacsd.json").read_text())
        assert (info["aet"], info["dicom_port"], p.port) == ("CLIAE", port, port)
    # Without the flags, the environment wins over the file.
    with serve(cfg, data) as p:
        info = json.loads((data / "pacsd.json").read_text())
        assert info["aet"] == "ENVAE"
        assert p.port == int(os.environ["PACSD_DICOM_PORT"])


# --- pacsd serve: refusing to start -----------------------------------------------------------

def test_serve_on_a_port_in_use_exits_69(cfg: Path, tmp_path: Path):
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        s.listen()
        port = s.getsockname()[1]
        r = pacsd("serve", "--config", str(cfg), "--dicom-port", str(port))
    assert r.returncode == EXIT_UNAVAILABLE, r.stderr
    line = last_line(r.stderr)
    assert line.startswith("pacsd: ") and str(port) in line and "in use" in line, line
    assert not (tmp_path / "data" / "pacsd.json").exists()
    assert not (tmp_path / "data" / "pacsd.pid").exists()


@pytest.mark.parametrize("where", ["data", "storage"])
def test_serve_on_an_unwritable_folder_exits_73(tmp_path: Path, where):
    # Root writes anywhere permissions allow; nobody can create a folder under a regular file.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    if where == "data":
        cfg = write_config(tmp_path / "pacsd.toml", blocker / "sub")
    else:
        cfg = write_config(tmp_path / "pacsd.toml", tmp_path / "data",
                           storage={"path": str(blocker / "images")})
    r = pacsd("serve", "--config", str(cfg))
    assert r.returncode == EXIT_CANTCREAT, r.stderr
    line = last_line(r.stderr)
    assert line.startswith("pacsd: ") and "not writable" in line and str(blocker) in line, line


def test_second_server_on_the_same_data_folder_exits_75(cfg: Path, tmp_path: Path):
    data = tmp_path / "data"
    with serve(cfg, data) as p:
        r = pacsd("serve", "--config", str(cfg))
        assert r.returncode == EXIT_TEMPFAIL, r.stderr
        line = last_line(r.stderr)
        assert f"pid {p.proc.pid}" in line and str(data) in line, line
        # The first one is unharmed and still owns its run files.
        assert json.loads((data / "pacsd.json").read_text())["pid"] == p.proc.pid
        with associate(p.port, [build_context(Verification)]) as assoc:
            assert assoc.send_c_echo().Status == 0


def test_sigterm_stops_cleanly(cfg: Path, tmp_path: Path):
    data = tmp_path / "data"
    with serve(cfg, data) as p:
        assert (data / "pacsd.pid").read_text().strip() == str(p.proc.pid)
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(20) == 0, p.output()
    assert not (data / "pacsd.pid").exists()
    assert not (data / "pacsd.json").exists()
    assert "pacsd stopped" in p.output()
    # A clean stop needs no recovery at the next start.
    with serve(cfg, data) as p:
        pass
    assert "did not stop cleanly" not in p.output()


def test_sigterm_while_starting_is_a_clean_stop(cfg: Path, tmp_path: Path):
    """A stop asked for in the middle of the start (a service manager's restart, a test that
    stops a server as soon as it appears) is honoured once started: exit 0, nothing to recover,
    never a death by SIGTERM's default action."""
    data = tmp_path / "data"
    log = tmp_path / "serve.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(pacsd_cmd("serve", "--config", str(cfg)), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:   # written early in the start, before the index, the workers and HTTP
                if (data / "pacsd.pid").read_text().strip() == str(proc.pid):
                    break
            except OSError:
                pass
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        terminate(proc)
    assert "pacsd stopped" in log.read_text()
    assert not (data / "pacsd.pid").exists()


# --- import, reindex, status ------------------------------------------------------------------

def make_import_folder(folder: Path) -> list[Path]:
    paths = write_series(folder, seed=5, patients=2, studies=1, series=2, images=3, size=32)
    (folder / "README.txt").write_text("not DICOM at all\n")
    (folder / "copies").mkdir()
    shutil.copy(paths[0], folder / "copies" / "again.dcm")
    return paths


def c_find(port: int, level: str, **keys: str) -> list[Dataset]:
    q = Dataset()
    q.QueryRetrieveLevel = level
    q.StudyInstanceUID = keys.pop("StudyInstanceUID", "")
    q.PatientID = ""
    for k, v in keys.items():
        setattr(q, k, v)
    with associate(port, [build_context(StudyRootQueryRetrieveInformationModelFind)]) as assoc:
        out = []
        for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
            assert status and status.Status in (0x0000, 0xFF00, 0xFF01), status
            if status.Status in (0xFF00, 0xFF01):
                out.append(ident)
    return out


def status_json(cfg: Path) -> tuple[int, dict]:
    r = pacsd("status", "--json", "--config", str(cfg))
    return r.returncode, json.loads(r.stdout)


def test_import_then_find_then_import_again(cfg: Path, tmp_path: Path):
    src = tmp_path / "incoming"
    paths = make_import_folder(src)
    data = tmp_path / "data"

    r = pacsd("import", "--config", str(cfg), str(src))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "imported 12 file(s), 1 duplicate(s), 1 refused"
    assert "README.txt" in r.stderr   # the refused file is named

    code, report = status_json(cfg)
    assert code == EXIT_NOT_RUNNING and report["running"] is False
    assert {k: report["index"][k] for k in ("patients", "studies", "series", "instances")} == \
        {"patients": 2, "studies": 2, "series": 4, "instances": 12}
    assert len(list((data / "storage").rglob("*.dcm"))) == 12

    with serve(cfg, data) as p:
        studies = c_find(p.port, "STUDY")
        assert len(studies) == 2
        assert {str(s.PatientID) for s in studies} == {"PID5-001", "PID5-002"}
        from pydicom import dcmread
        first = dcmread(paths[0], stop_before_pixels=True)
        images = c_find(p.port, "IMAGE", StudyInstanceUID=str(first.StudyInstanceUID),
                        SeriesInstanceUID=str(first.SeriesInstanceUID), SOPInstanceUID="")
        assert len(images) == 3
        assert str(first.SOPInstanceUID) in {str(i.SOPInstanceUID) for i in images}

    r = pacsd("import", "--config", str(cfg), str(src))
    assert r.stdout.strip() == "imported 0 file(s), 13 duplicate(s), 1 refused"
    # Everything importable is already archived: that is success, as on the first run.
    assert r.returncode == 0, r.stderr
    assert len(list((data / "storage").rglob("*.dcm"))) == 12   # no second copies kept


def test_import_of_nothing_but_junk_fails(cfg: Path, tmp_path: Path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    (junk / "b.dcm").write_bytes(b"\0" * 200)
    r = pacsd("import", "--config", str(cfg), str(junk))
    assert r.returncode == 1
    assert r.stdout.strip() == "imported 0 file(s), 0 duplicate(s), 2 refused"


def test_reindex_rebuilds_a_lost_index(cfg: Path, tmp_path: Path):
    data = tmp_path / "data"
    make_import_folder(tmp_path / "incoming")
    assert pacsd("import", "--config", str(cfg), str(tmp_path / "incoming")).returncode == 0
    _, before = status_json(cfg)

    for f in data.glob("index.sqlite3*"):
        f.unlink()
    r = pacsd("reindex", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"reindexed 12 instance(s) from {data / 'storage'}"
    _, after = status_json(cfg)
    assert after["index"] == before["index"]
    db = sqlite3.connect(data / "index.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()

    # Again over a complete index: the same counts, nothing doubled.
    assert pacsd("reindex", "--config", str(cfg)).returncode == 0
    assert status_json(cfg)[1]["index"] == before["index"]


def test_reindex_refuses_while_a_server_runs(cfg: Path, tmp_path: Path):
    data = tmp_path / "data"
    with serve(cfg, data) as p:
        r = pacsd("reindex", "--config", str(cfg))
        assert r.returncode == EXIT_TEMPFAIL, r.stderr
        assert f"pid {p.proc.pid}" in last_line(r.stderr)
        assert p.proc.poll() is None


def test_status(cfg: Path, tmp_path: Path):
    data = tmp_path / "data"
    r = pacsd("status", "--config", str(cfg))
    assert r.returncode == EXIT_NOT_RUNNING, r.stderr
    assert "running: False" in r.stdout

    make_import_folder(tmp_path / "incoming")
    assert pacsd("import", "--config", str(cfg), str(tmp_path / "incoming")).returncode == 0
    with serve(cfg, data) as p:
        code, report = status_json(cfg)
        assert code == 0, report
        assert report["running"] is True
        assert report["pid"] == p.proc.pid and report["dicom_port"] == p.port
        assert report["aet"] == "PACSD"
        assert report["echo"].startswith("ok")
        assert report["index"]["instances"] == 12 and report["index"]["studies"] == 2
        # SIGKILL: pacsd.json stays behind, but nothing answers.
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(10)
        assert (data / "pacsd.json").exists()
        code, report = status_json(cfg)
        assert code == EXIT_NOT_RUNNING and report["running"] is False


# --- nodes ------------------------------------------------------------------------------------

def test_nodes_list_and_echo(cfg: Path, tmp_path: Path):
    # The lists below are the configs' own nodes: without the test clients (QR_CLIENTS).
    cfg = write_config(cfg, tmp_path / "data", qr_clients=False)
    r = pacsd("nodes", "--config", str(cfg))
    assert r.returncode == 0 and "no nodes" in r.stdout

    data = tmp_path / "data"
    with serve(cfg, data) as p:
        nodes_cfg = write_config(tmp_path / "nodes.toml", tmp_path / "other", qr_clients=False, nodes=[
            {"name": "archive", "aet": "PACSD", "host": LOCAL, "port": p.port},
            {"name": "viewer", "aet": "VIEWER", "host": LOCAL, "port": 4242}])
        r = pacsd("nodes", "--config", str(nodes_cfg))
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert len(lines) == 2
        assert lines[0].split() == ["archive", "PACSD", f"{LOCAL}:{p.port}", "(config)"]
        assert lines[1].split() == ["viewer", "VIEWER", f"{LOCAL}:4242", "(config)"]

        live_only = write_config(tmp_path / "live.toml", tmp_path / "other", qr_clients=False, nodes=[
            {"name": "archive", "aet": "PACSD", "host": LOCAL, "port": p.port}])
        r = pacsd("nodes", "--echo", "--config", str(live_only))
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "archive" in r.stdout and "C-ECHO ok" in r.stdout

        dead = free_port()
        both = write_config(tmp_path / "both.toml", tmp_path / "other", qr_clients=False, nodes=[
            {"name": "archive", "aet": "PACSD", "host": LOCAL, "port": p.port},
            {"name": "gone", "aet": "GONE", "host": LOCAL, "port": dead}])
        r = pacsd("nodes", "--echo", "--config", str(both))
        assert r.returncode == 1, (r.stdout, r.stderr)
        out = dict(line.split(None, 1) for line in r.stdout.splitlines())
        assert "C-ECHO ok" in out["archive"] and "C-ECHO FAILED" in out["gone"]


def test_bad_node_is_a_config_error(tmp_path: Path):
    cfg = write_config(tmp_path / "pacsd.toml", tmp_path / "data",
                       nodes=[{"name": "x", "aet": "X", "host": LOCAL, "port": 0}])
    r = pacsd("nodes", "--config", str(cfg))
    assert r.returncode == EXIT_CONFIG
    assert "[[nodes]] #1" in one_line(r.stderr)


def test_status_echo_passes_an_allow_list(tmp_path: Path):
    # The server's own AE title may always call it, so the self-check works with an allow-list
    # that shuts everyone else out.
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "allow.toml", data, dicom={"allowed_calling_aets": ["CT1"]})
    with serve(cfg, data):
        code, report = status_json(cfg)
        assert code == 0 and report["echo"].startswith("ok"), report
        r = subprocess.run(pacsd_cmd("nodes", "--config", str(write_config(
            tmp_path / "n.toml", tmp_path / "o", nodes=[{"aet": "PACSD", "host": LOCAL,
                                                         "port": json.loads(
                (data / "pacsd.json").read_text())["dicom_port"]}],
            dicom={"aet": "OTHER"})), "--echo"), capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "FAILED" in r.stdout   # OTHER is not on the list


# --- retrieve ---------------------------------------------------------------------------------

def test_retrieve_queries_a_node_and_moves_what_matches_here(tmp_path: Path):
    """`pacsd retrieve`: C-FIND on a remote pacsd, then C-MOVE to the running local pacsd."""
    from pydicom import dcmread
    files = write_series(tmp_path / "in", seed=21, patients=2, studies=2, series=1, images=2,
                         size=32)
    local_data = tmp_path / "local"
    with remote_pacsd(tmp_path, files) as (remote, local_port):
        local_cfg = write_config(tmp_path / "local.toml", local_data,
                                 dicom={"aet": "LOCALPACS", "port": local_port},
                                 nodes=[{"name": "archive", "aet": "REMOTE", "host": LOCAL,
                                         "port": remote.port}])
        with serve(local_cfg, local_data, log_name="local.log"):
            listed = pacsd("retrieve", "archive", "--patient-id", "PID21-002", "--list",
                           "--config", str(local_cfg))
            assert listed.returncode == 0, listed.stderr
            assert "2 study(ies) on archive" in listed.stdout
            r = pacsd("retrieve", "archive", "--patient-id", "PID21-002",
                      "--config", str(local_cfg), timeout=120)
            assert r.returncode == 0, (r.stdout, r.stderr)
            assert r.stdout.count("2 retrieved, 0 failed") == 2, r.stdout
            status = json.loads(pacsd("status", "--json", "--config", str(local_cfg)).stdout)
            assert status["index"]["instances"] == 4
        wanted = {str(dcmread(f).SOPInstanceUID) for f in files
                  if dcmread(f).PatientID == "PID21-002"}
        stored = {str(dcmread(p).SOPInstanceUID)
                  for p in (local_data / "storage").rglob("*.dcm") if ".tmp" not in p.parts}
        assert stored == wanted
        bad = pacsd("retrieve", "nowhere", "--patient-id", "X", "--config", str(local_cfg))
        assert bad.returncode == 1 and "no node named 'nowhere'" in bad.stderr
        vague = pacsd("retrieve", "archive", "--config", str(local_cfg))
        assert vague.returncode == 1 and "say what to retrieve" in vague.stderr
