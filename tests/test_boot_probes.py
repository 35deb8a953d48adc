"""Boot probes with real guests under libvirt/QEMU (TCG where KVM cannot run
one): a guest that prints only on its screen is verified by reading its
screen (tesseract) in a test failover, and by its DHCP lease on a real
libvirt NAT network; a bootloader's banner does not pass for a boot; a
guest without qemu-ga is reported as such by the agent probe; bad probes
are refused."""

import json
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError

from replication.choices import FailoverStatus, JobStatus
from replication.management.following import print_outcome
from replication.models import FailoverJob, VirtualMachine, VMContext
from replication.platforms import get_destination
from replication.platforms.base import DEFAULT_BOOT_PROBES, DestinationError, VMShape
from replication.platforms.local.libvirt import LibvirtDestination
from replication.services.inventory import register_image_vm
from replication.services.jobs import start_replication
from simulators.boot_disk import boot_disk_builder
from simulators.dhcp_network import dhcp_network
from tests.helpers import command, wait_for_job, wait_until

pytestmark = [pytest.mark.integration]

boot_disk = boot_disk_builder()
BOOT_TIMEOUT_S = 240



@pytest.fixture
def destination(tmp_path):
    dest = LibvirtDestination("qemu:///system", tmp_path / "run")
    made = []
    yield dest, made
    for name, handles in made:
        dest.destroy(name)
        dest.discard_protection(handles)
    dest.close()


def boot(dest, made, name, disk, network=None, mac=None):
    from replication.platforms.base import NIC

    dest.destroy(name)
    handles = dest.protect([str(disk)], name)
    made.append((name, handles))
    nics = (NIC(mac=mac, source_network=""),) if mac else ()
    dest.define_vm(name, VMShape(cpus=1, memory_mib=256, nics=nics), [(handles[0], "disk-2000")], network=network)
    dest.start(name)


@pytest.mark.django_db(transaction=True)
def test_a_screen_only_guest_is_verified_by_its_screen_in_a_test_failover(celery_worker_process, tmp_path):
    disk = tmp_path / "screen.img"
    boot_disk.build_boot_disk(disk, "ONSCREEN", screen_only=True)
    vm = register_image_vm("vm-screen", [str(disk)])
    job = wait_for_job(start_replication(vm).id, timeout=120)
    assert job.status == JobStatus.COMPLETED, job.error_message
    # No probes set: the default ones; the regex is the marker so that the
    # screen's reading is checked to the letter.
    command("set_boot_check", "vm-screen", "--regex", r"BOOT-MARKER: \w+", "--timeout", str(BOOT_TIMEOUT_S))
    assert VMContext.of(vm).probes() == DEFAULT_BOOT_PROBES

    report = json.loads(command("failover", "vm-screen", "--test", "--wait", "--json"))
    try:
        assert report["status"] == FailoverStatus.SUCCEEDED and report["boot_verified"], report
        assert report["boot_probe"] == "screen", report
        assert report["console_match"] == "BOOT-MARKER: ONSCREEN", report
        verify = next(s for s in report["steps"] if s["name"] == "verify boot")
        assert verify["detail"] == "screen: BOOT-MARKER: ONSCREEN"
        out = StringIO()
        print_outcome(FailoverJob.objects.get(pk=report["id"]), out, as_json=False)
        assert "booted; seen by screen: 'BOOT-MARKER: ONSCREEN'" in out.getvalue()
        # The serial console printed nothing of the guest: only the screen could see it.
        assert "BOOT-MARKER" not in get_destination().console_text(report["destination_vm"])
    finally:
        command("failover_end", "vm-screen")


def test_a_bootloader_banner_is_not_a_boot(destination, tmp_path):
    """A disk whose bootloader cannot find its kernel: SYSLINUX's banner on
    the console and the screen, and never a verified boot by the default
    probes and regex."""
    dest, made = destination
    disk = tmp_path / "nokernel.img"
    boot_disk.build_boot_disk(disk, "NEVER")
    offset = boot_disk.partition_offset(disk)
    boot_disk._run("mdel", "-i", f"{disk}@@{offset}", "::/vmlinuz")
    boot(dest, made, "oma-test-probe-banner", disk)
    wait_until(lambda: "SYSLINUX" in dest.console_text("oma-test-probe-banner"), 120, "SYSLINUX's banner",
               interval=0.5)
    wait_until(lambda: "SYSLINUX" in dest.screen_text("oma-test-probe-banner"), 60, "the banner on the screen",
               interval=1)
    with pytest.raises(DestinationError) as failed:
        dest.verify_boot("oma-test-probe-banner", [], "", 15, lambda: None)
    message = str(failed.value)
    assert message.startswith("boot not verified (not within 15 s): console: never showed /(?i)"), message
    assert "network: the VM has no NIC on a libvirt network" in message
    assert "agent: no agent answered" in message
    assert "console's last lines:" in message and "SYSLINUX" in message
    assert "screen's last lines (OCR):" in message


def test_a_screen_only_guest_is_seen_by_its_dhcp_lease_and_has_no_agent(destination, tmp_path):
    dest, made = destination
    disk = tmp_path / "net.img"
    boot_disk.build_boot_disk(disk, "NET1", screen_only=True)
    with dhcp_network() as network:
        boot(dest, made, "oma-test-probe-net", disk, network=network, mac="52:54:00:2a:00:29")
        evidence = dest.verify_boot("oma-test-probe-net", ["network"], "", BOOT_TIMEOUT_S, lambda: None)
        assert evidence.probe == "network"
        assert evidence.text.startswith("DHCP lease ") and "for 52:54:00:2a:00:29 on network " + network \
            in evidence.text, evidence
        # The guest asks for its lease after printing its marker: it is on the screen already.
        assert "BOOT-MARKER: NET1" in dest.screen_text("oma-test-probe-net")
        # The same guest by its screen, once booted.
        seen = dest.verify_boot("oma-test-probe-net", ["screen"], r"BOOT-MARKER: \w+", 60, lambda: None)
        assert (seen.probe, seen.text) == ("screen", "BOOT-MARKER: NET1")
        # The test guest runs no qemu-ga: the agent probe says so, by the timeout.
        with pytest.raises(DestinationError, match=r"\(not within 3 s\): agent: no agent answered \(.*not "
                                                   r"connected"):
            dest.verify_boot("oma-test-probe-net", ["agent"], "", 3, lambda: None)
        # A VM that stops fails at once, with what its screen showed last.
        dest._domain("oma-test-probe-net").destroy()
        with pytest.raises(DestinationError, match=r"\(the VM is shutoff\)"):
            dest.verify_boot("oma-test-probe-net", ["console"], "", BOOT_TIMEOUT_S, lambda: None)
        # Its lease stays in dnsmasq's table: a new VM with that MAC is not verified by the old lease.
        dest.destroy("oma-test-probe-net")
        boot(dest, made, "oma-test-probe-net", disk, network=network, mac="52:54:00:2a:00:29")
        again = dest.verify_boot("oma-test-probe-net", ["network"], "", BOOT_TIMEOUT_S, lambda: None)
        assert again.probe == "network" and again.text != evidence.text
        assert "BOOT-MARKER: NET1" in dest.screen_text("oma-test-probe-net")
        dest.destroy("oma-test-probe-net")


@pytest.mark.django_db
def test_bad_probes_are_refused(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 1024 * 1024)
    vm = register_image_vm("vm-probes", [str(disk)])
    with pytest.raises(CommandError, match=r"--probe: unknown boot probe\(s\) 'ping': choose from console, "
                                           r"screen, network, agent"):
        command("set_boot_check", "vm-probes", "--probe", "console", "--probe", "ping")
    with pytest.raises(CommandError, match="nothing to set"):
        command("set_boot_check", "vm-probes")
    with pytest.raises(CommandError, match="is not a regular expression"):
        command("set_boot_check", "vm-probes", "--probe", "screen", "--regex", "(")
    assert VMContext.of(vm).boot_probes == ""  # nothing half-set
    out = command("set_boot_check", "vm-probes", "--probe", "network", "--probe", "screen", "--timeout", "300")
    assert "any of screen, network sees it within 300 s" in out
    context = VMContext.of(VirtualMachine.objects.get(name="vm-probes"))
    assert (context.boot_probes, context.probes()) == ("screen,network", ("screen", "network"))
    command("set_boot_check", "vm-probes", "--probe", "default")
    assert VMContext.of(vm).probes() == DEFAULT_BOOT_PROBES
    context.boot_probes = "console,telepathy"
    with pytest.raises(ValidationError, match="telepathy"):
        context.full_clean()
