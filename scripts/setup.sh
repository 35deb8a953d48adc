#!/usr/bin/env bash
# Install everything a fresh Debian 12 machine lacks to run the project:
# Debian packages, a virtualenv with the pinned requirements, and the bridge
# that lets the venv import Debian's libnbd bindings (not on PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(nbdkit libnbd-bin python3-libnbd qemu-utils redis-server
              libmariadb-dev pkg-config gcc python3-dev python3-venv procps
              chromium golang-go golang-github-vmware-govmomi-dev
              # failover: a local KVM/TCG destination through libvirt, and the
              # bootable test disk (kernel, busybox initramfs, syslinux on FAT)
              qemu-system-x86 libvirt-daemon-system libvirt-clients python3-libvirt
              syslinux syslinux-common extlinux mtools busybox-static
              linux-image-amd64 dosfstools
              # guest conversion before a failed-over VM's first boot
              virt-v2v
              # real guests: UEFI (OVMF, Secure Boot), a vTPM, the screen read
              # by OCR, a DHCP test network, and a unified kernel image for a
              # UEFI-only test disk
              ovmf swtpm swtpm-tools tesseract-ocr tesseract-ocr-eng dnsmasq-base
              systemd-boot-efi
              # a Secure Boot test guest: Debian's signed shim and grub
              shim-signed grub-efi-amd64-signed
              # the agents' outbound tunnels end at the OMA's own sshd for agents
              openssh-server
              # agents' brokers: the machine's RabbitMQ (plain AMQP), and the
              # tests' private TLS-only node (tests/rabbit_node.py runs
              # /usr/lib/rabbitmq/bin/rabbitmq-server) with a CA made by openssl
              rabbitmq-server openssl)

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

# Front-end packages (Bootstrap, htmx; axe-core for the browser tests) from
# npm at the versions package-lock.json pins; Django serves them from
# node_modules (no CDN: the OMA may have no internet). npm ci replaces
# node_modules, so it runs only when the lock file changed since the last one.
if ! command -v npm >/dev/null; then
  echo "setup: installing npm"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm >/dev/null
fi
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
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

# libvirt-python: Debian's python3-libvirt matches the installed libvirt 9.0;
# bridge only its modules into the venv, the same way as libnbd.
lvbridge="$site/debian-libvirt"
mkdir -p "$lvbridge"
for f in /usr/lib/python3/dist-packages/libvirt.py /usr/lib/python3/dist-packages/libvirtmod.cpython-311-*.so \
         /usr/lib/python3/dist-packages/libvirt_qemu.py /usr/lib/python3/dist-packages/libvirtmod_qemu.cpython-311-*.so \
         /usr/lib/python3/dist-packages/libvirt_lxc.py /usr/lib/python3/dist-packages/libvirtmod_lxc.cpython-311-*.so; do
  if [ -e "$f" ]; then ln -sf "$f" "$lvbridge/"; fi
done
echo "$lvbridge" > "$site/debian-libvirt.pth"
.venv/bin/python -c 'import libvirt; print("setup: libvirt-python", libvirt.getVersion())'
# Byte-compile the bridged modules and the agent, as pip does for what it
# installs: a shell with PYTHONDONTWRITEBYTECODE would otherwise compile them
# again on every start (the copy CLI started 25 ms slower so).
.venv/bin/python -m compileall -q "$bridge" "$lvbridge" vma_agent
mkdir -p var
