"""An isolated libvirt NAT network with DHCP (dnsmasq) for tests and benches
of the network boot probe: a unique name, bridge and /24 subnet, transient
(virNetworkCreateXML: gone once destroyed), torn down on leaving."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import xml.etree.ElementTree as ET

import libvirt


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    return [ipaddress.ip_interface(field).network for line in out.splitlines()
            for field in line.split()[3:4]]


def free_subnet() -> ipaddress.IPv4Network:
    used = _subnets_in_use()
    start = os.getpid() % 200
    for step in range(250):
        subnet = ipaddress.ip_network(f"10.251.{(start + step) % 250}.0/24")
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError("no free 10.251.x.0/24 subnet for a test network")


@contextlib.contextmanager
def dhcp_network(uri: str = "qemu:///system", prefix: str = "oma-net"):
    """Yields the name of a running NAT network with a DHCP range."""
    subnet = free_subnet()
    tag = f"{os.getpid() % 100000}-{subnet.network_address.packed[2]}"
    name, bridge = f"{prefix}-{tag}", f"vbp{tag}"[:15]
    hosts = list(subnet.hosts())
    net = ET.Element("network")
    ET.SubElement(net, "name").text = name
    ET.SubElement(net, "forward", mode="nat")
    ET.SubElement(net, "bridge", name=bridge, stp="on", delay="0")
    ip = ET.SubElement(net, "ip", address=str(hosts[0]), netmask=str(subnet.netmask))
    dhcp = ET.SubElement(ip, "dhcp")
    ET.SubElement(dhcp, "range", start=str(hosts[99]), end=str(hosts[199]))
    conn = libvirt.open(uri)
    try:
        network = conn.networkCreateXML(ET.tostring(net, encoding="unicode"))
        try:
            yield name
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                network.destroy()
    finally:
        conn.close()
