"""What the web benchmarks share: a `pacsd serve` subprocess on 127.0.0.1 and storing into it."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
LOCAL = "127.0.0.1"
sys.path.insert(0, str(REPO / "tests"))

from conftest import terminate  # noqa: E402  (the tests' helper: SIGTERM, then SIGKILL)
from harness import BenchError, wait_pacsd  # noqa: E402


@dataclass
class Pacsd:
    proc: subprocess.Popen
    dicom_port: int
    http_url: str
    log: Path


@contextmanager
def pacsd(workdir: Path, timeout: float = 60, extra: str = "", src: Path = REPO
          ) -> Iterator[Pacsd]:
    """Run `pacsd serve` with a fresh data folder in `workdir`, ports 0; stop it afterwards.
    `extra`: more TOML (whole sections other than [server], [dicom], [http], [log]); `src`:
    the source tree whose pacsd runs (another commit's, to compare)."""
    data, log, cfg = workdir / "data", workdir / "pacsd.log", workdir / "pacsd.toml"
    cfg.write_text(f'[server]\ndata = "{data}"\n[dicom]\nport = 0\nbind = "{LOCAL}"\n'
                   f'[http]\nport = 0\nbind = "{LOCAL}"\n[log]\nfile = "{log}"\n{extra}')
    proc = subprocess.Popen([sys.executable, "-m", "pacsd", "serve", "--config", str(cfg)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=src)
    try:
        try:
            info = wait_pacsd(proc, data, timeout, log)
        except BenchError as e:   # these scripts end with a message, not a traceback
            raise SystemExit(str(e)) from None
        yield Pacsd(proc, int(info["dicom_port"]), f"http://{LOCAL}:{info['http_port']}", log)
    finally:
        terminate(proc, 30)


def store(port: int, paths: list[Path]) -> None:
    """C-STORE files: DCMTK's storescu when installed (TCP_NODELAY=1), else pynetdicom."""
    storescu = next((p for p in ("/usr/bin/storescu", "/usr/local/bin/storescu",
                                 "/opt/homebrew/bin/storescu") if Path(p).exists()), None)
    if storescu:
        subprocess.run([storescu, "-aec", "PACSD", LOCAL, str(port), *map(str, paths)],
                       check=True, timeout=600, env={**os.environ, "TCP_NODELAY": "1"},
                       capture_output=True)
        return
    from conftest import store_files
    statuses = store_files(port, paths)
    if set(statuses) != {0}:
        raise SystemExit(f"C-STORE failed: {sorted(set(statuses))}")
