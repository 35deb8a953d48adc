"""The platforms behind their interfaces: every provider and destination
implements the whole of replication.platforms.base, and the services reach a
destination only through it (no getattr or hasattr on one). No libvirtd, no
cloud: the parts that need neither."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import replication.platforms
from replication.models import CloudStackConfig, TargetVolume
from replication.platforms.base import (
    DEFAULT_BOOT_PROBES,
    DEFAULT_BOOT_REGEX,
    BootEvidence,
    Destination,
    DestinationError,
    TargetProvider,
    parse_boot_probes,
)
from replication.platforms.cloudstack.destination import CloudStackDestination
from replication.platforms.local.libvirt import LibvirtDestination

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


def test_every_platform_implements_the_whole_interface():
    for module in pkgutil.walk_packages(replication.platforms.__path__, "replication.platforms."):
        importlib.import_module(module.name)
    destinations = _subclasses(Destination)
    providers = _subclasses(TargetProvider)
    assert {c.__name__ for c in destinations} >= {"LibvirtDestination", "CloudStackDestination"}
    assert {c.__name__ for c in providers} >= {"LocalVolumeProvider", "CloudStackVolumeProvider"}
    for cls in destinations | providers:
        assert not cls.__abstractmethods__, f"{cls.__name__} leaves {sorted(cls.__abstractmethods__)} out"
    # What the failover used to look up by name is part of the interface.
    assert {"verify_boot", "check_ready", "close", "replica_handle"} <= Destination.__abstractmethods__


def test_services_reach_a_platform_only_through_its_interface():
    """getattr/hasattr on a destination or provider is duck typing the
    interface should make needless."""
    offenders = []
    for path in sorted((PROJECT_ROOT / "replication").rglob("*.py")):
        if "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr") and node.args
                    and isinstance(node.args[0], ast.Name)
                    and node.args[0].id in ("destination", "provider")):
                offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_each_destination_names_a_replica_its_own_way(tmp_path):
    volume = TargetVolume(path=str(tmp_path / "replica.img"), cloud_volume_id="")
    libvirt = LibvirtDestination("qemu:///system", tmp_path)
    cloud = CloudStackDestination(CloudStackConfig(name="cloud"), job_timeout_s=1, settle_s=1)
    assert libvirt.replica_handle(volume) == volume.path
    with pytest.raises(DestinationError, match=f"{volume.export_name} is not a CloudStack volume"):
        cloud.replica_handle(volume)
    volume.cloud_volume_id = "0b1c2d3e-volume"
    assert cloud.replica_handle(volume) == "0b1c2d3e-volume"


def test_libvirt_verifies_the_boot_on_its_console(tmp_path, monkeypatch):
    destination = LibvirtDestination("qemu:///system", tmp_path)
    console = {"text": "SeaBIOS (version 1.16.2)\nBooting from Hard Disk...\nSYSLINUX 6.04 EDD Copyright (C)\n"
                       "Welcome to the guest\nweb01 login: "}
    states = {"vm": "running"}
    monkeypatch.setattr(destination, "console_text", lambda vm: console["text"])
    monkeypatch.setattr(destination, "state", lambda vm: states[vm])
    beats = []
    assert destination.verify_boot("vm", ["console"], r"Welcome", 5, beats.append) == \
        BootEvidence("console", "Welcome to the guest")
    # No regex: the default one, a login prompt; never the firmware's or bootloader's banner.
    assert destination.verify_boot("vm", ["console"], "", 5, beats.append) == BootEvidence("console", "web01 login:")
    with pytest.raises(DestinationError, match=r"boot not verified \(not within 0 s\): console: never showed "
                                               r"/login ok/\nconsole's last lines:\nSeaBIOS"):
        destination.verify_boot("vm", ["console"], r"login ok", 0, beats.append)
    console["text"] = "SeaBIOS (version 1.16.2)\nBooting from Hard Disk...\nSYSLINUX 6.04 EDD Copyright (C)\n"
    with pytest.raises(DestinationError, match=r"not within 0 s\): console: never showed /\(\?i\)"):
        destination.verify_boot("vm", ["console"], "", 0, beats.append)
    states["vm"] = "shutoff"
    with pytest.raises(DestinationError, match=r"(?s)\(the VM is shutoff\): console: never showed .*SYSLINUX 6.04"):
        destination.verify_boot("vm", ["console"], "", 5, beats.append)


def test_default_boot_regex_matches_booted_guests_not_banners():
    regex = re.compile(DEFAULT_BOOT_REGEX)
    for booted in ("debian login:", "web01 login :", "BOOT-MARKER: A", "Press Ctrl+Alt+Delete to unlock.",
                   "Press Ctrl + Alt + Del to sign in", "Sign in"):
        assert regex.search(booted), booted
    for banner in ("SeaBIOS (version 1.16.2-debian-1.16.2-1)", "Booting from Hard Disk...",
                   "SYSLINUX 6.04 EDD 20210613 Copyright (C) 1994-2015 H. Peter Anvin et al", "Welcome to GRUB!",
                   "Loading Linux 6.1.0-28-amd64 ...", "BdsDxe: loading Boot0001 \"UEFI QEMU HARDDISK\"",
                   "BOOT-STAGE: init started", "BOOT-MARKER-ERROR: no FAT partition with a MARKER file found"):
        assert not regex.search(banner), banner


def test_boot_probes_are_parsed_and_checked():
    assert parse_boot_probes("") == DEFAULT_BOOT_PROBES
    assert parse_boot_probes("network, Screen,network") == ("screen", "network")
    with pytest.raises(ValueError, match="unknown boot probe\\(s\\) 'ping': choose from console, screen"):
        parse_boot_probes(["console", "ping"])


def test_cloudstack_verifies_the_boot_by_the_vm_staying_up(monkeypatch):
    destination = CloudStackDestination(CloudStackConfig(name="cloud"), job_timeout_s=1, settle_s=0.2)
    monkeypatch.setattr(destination, "state", lambda vm: "running")
    assert destination.verify_boot("vm", ["console", "screen"], "ignored", 5, lambda: None) == \
        BootEvidence("running", "CloudStack shows no console: running for 0 s")
    monkeypatch.setattr(destination, "state", lambda vm: "crashed")
    with pytest.raises(DestinationError, match="VM vm is crashed"):
        destination.verify_boot("vm", [], "", 5, lambda: None)
