"""The server's processes: `server` (start-up, recovery, listeners, pidfile, signals: what
`pacsd serve` runs, the supervisor), `workers` (the DICOM worker processes, as the supervisor
keeps them) and `worker` (one of them, `python -m pacsd.daemon.worker`). Nothing is imported
here: a worker process loads only what the DICOM side needs."""
