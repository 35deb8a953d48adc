#!/usr/bin/env bash
# Install everything a fresh Debian 12 machine lacks to run the project:
# Debian packages, a virtualenv with the pinned requirements, and the bridge
# that lets the venv import Debian's libnbd bindings (not on PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(nbdkit libnbd-bin python3-libnbd qemu-utils redis-server
              libmariadb-dev pkg-config gcc python3-dev python3-venv procps
              chromium golang-go golang-github-vmware-govmomi-dev)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt

# libnbd's Python module lives in Debian's dist-packages; expose only that
# module (not all of dist-packages) to the venv through a .pth file.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
bridge="$site/debian-libnbd"
mkdir -p "$bridge"
for f in /usr/lib/python3/dist-packages/nbd.py /usr/lib/python3/dist-packages/libnbdmod.cpython-311-*.so; do
  ln -sf "$f" "$bridge/"
done
echo "$bridge" > "$site/debian-libnbd.pth"
.venv/bin/python -c 'import nbd; print("setup: libnbd", nbd.NBD().get_version())'
mkdir -p var
