#!/bin/sh
# Install pacsd as a service in one command, from a clone of its repository:
#   sudo sh installer/install.sh [apply|plan|status|uninstall] [pacsd-install options]
# It puts pacsd in a Python environment of its own that the service user can read
# (/opt/pacsd on Linux, /usr/local/pacsd on macOS; PACSD_PREFIX to change it), then runs
# `pacsd-install apply` (or the action given) from there. `plan` builds nothing: it runs from
# this clone with the Python found below.
set -eu
case "${1:-}" in plan|apply|status|uninstall) action=$1; shift ;; *) action=apply ;; esac
src=$(cd "$(dirname "$0")/.." && pwd)
case "$(uname -s)" in
    Linux) prefix=${PACSD_PREFIX:-/opt/pacsd}; hint="apt-get install python3 python3-venv" ;;
    Darwin) prefix=${PACSD_PREFIX:-/usr/local/pacsd}; hint="python.org's installer or brew install python" ;;
    *) echo "install.sh: pacsd installs on Linux or macOS, not $(uname -s)" >&2; exit 1 ;;
esac
if [ "$(id -u)" != 0 ] && [ "$action" != plan ] && [ "$action" != status ]; then
    echo "install.sh: run it as root: sudo sh $0 $action $*" >&2; exit 1
fi
# A Python installed for every user first (a personal one, e.g. pyenv's under a home folder, is
# closed to the service user), then whatever is on PATH.
python=""
for p in /usr/bin/python3 /usr/local/bin/python3 /opt/homebrew/bin/python3 \
         /Library/Frameworks/Python.framework/Versions/Current/bin/python3 \
         python3.14 python3.13 python3.12 python3.11 python3; do
    if command -v "$p" >/dev/null 2>&1 &&
       "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        python=$(command -v "$p"); break
    fi
done
[ -n "$python" ] || { echo "install.sh: pacsd needs Python 3.11 or newer ($hint)" >&2; exit 1; }
if [ "$action" = plan ]; then
    # A plan changes nothing, so it builds no environment either: it runs from this clone (the
    # pacsd apply would install), with the packages laid out as pip would lay them out.
    shim=$(mktemp -d)
    mkdir "$shim/pacsd_installer"
    for f in "$src"/installer/*.py; do ln -s "$f" "$shim/pacsd_installer/"; done
    ln -s "$src/systemd" "$shim/pacsd_installer/systemd"
    ln -s "$src/launchd" "$shim/pacsd_installer/launchd"
    rc=0
    PYTHONPATH="$shim:$src" PYTHONDONTWRITEBYTECODE=1 "$python" -m pacsd_installer plan "$@" || rc=$?
    rm -rf "$shim"
    exit "$rc"
fi
if [ ! -x "$prefix/bin/pacsd-install" ] || [ "$action" = apply ]; then
    "$python" -m venv "$prefix" || { echo "install.sh: no venv module ($hint)" >&2; exit 1; }
    "$prefix/bin/pip" install --quiet --upgrade "$src"
    chmod -R go+rX "$prefix"   # root's umask may be 077: the service user must read it
fi
exec "$prefix/bin/pacsd-install" "$action" "$@"
