"""The local platform: target volumes as files served by the OMA's nbdkit export
server, failed-over VMs on local KVM (or plain QEMU) through libvirt."""
