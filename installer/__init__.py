"""pacsd-install: sets pacsd up as a service that starts at boot and comes back by itself.

plan (print every change), apply, uninstall (images kept unless --purge), status; per OS:
`linux` (systemd units) and `macos` (launchd plists, power settings, automatic log-in).
Installed as the package `pacsd_installer`; the unit templates come from systemd/ and launchd/.
"""
