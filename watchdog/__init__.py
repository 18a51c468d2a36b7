"""pacsd-watchdog: a separate process that finds a hung pacsd and kills it, so that launchd or
systemd (which restart a server that exits) restart it.

    probes.py  what is asked of the server each round: HTTP /testdbalive, XML-RPC Ping, a C-ECHO
               to its own AE title, optionally a C-STORE + C-FIND round trip
    policy.py  when to act: the grace period, consecutive failed rounds, the kill-rate limit
    kill.py    how: check the PID is still that pacsd, SIGUSR1 (stack dump), SIGTERM, SIGKILL
               (at once for a stopped process, after `react_wait` for one showing no sign of
               stopping; or `launchctl kickstart -k`), and the `on_kill` command
    cli.py     the loop, the config (the server's own TOML file, its [watchdog] section), logs

Installed as the package `pacsd_watchdog` (the folder is `watchdog/`), so that it never shadows
the popular `watchdog` package from PyPI.
"""
