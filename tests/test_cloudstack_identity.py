"""A failed-over VM keeps its identity on CloudStack, against
simulators/cloudstack.py (a test double held to CloudStack's own API as
simulators/cloudstack_api.py encodes it): each NIC with its MAC and IP, a
service offering for its CPUs and memory, its boot type and disk
controller; the guest converted on the volumes while the OMA still has
them. And the simulator itself held to that API: every call the project
makes names only parameters CloudStack has, a missing required one is
refused with 431 in CloudStack's envelope."""

import ast
import json
from io import StringIO
from pathlib import Path

import pytest
import requests
from django.core.management import call_command

from replication.choices import JobStatus
from replication.models import CloudError, CloudStackConfig, FailoverJob, NetworkMapping
from replication.platforms.base import NIC, DestinationError, GuestNotConverted, VMShape
from replication.platforms.cloudstack.client import CloudClient
from replication.platforms.cloudstack.destination import CloudStackDestination
from replication.platforms.cloudstack.volumes import device_name
from replication.services.failover_checks import FailoverError, production_network
from replication.services.jobs import start_replication
from simulators.cloudstack import signature
from simulators.cloudstack_api import API, FRAMEWORK
from tests.helpers import wait_for_job
from tests.test_cloudstack import add_cloud, cloud, image_vm_on_cloud  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent


# The API sheet ----------------------------------------------------------------------

def project_calls() -> list[tuple[str, str, set[str], bool]]:
    """Every CloudStack call in the project's code: (where, command, the
    parameter names it passes, whether it passes more through **)."""
    found = []
    for path in sorted((ROOT / "replication").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("call", "_call", "one") and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                continue
            command = node.args[0].value
            if command not in API and not command[:1].islower():
                continue
            names, dynamic = set(), False
            for keyword in node.keywords:
                if keyword.arg is not None:
                    names.add(keyword.arg)
                elif isinstance(keyword.value, ast.Dict):  # **{"name": ...}
                    names |= {k.value for k in keyword.value.keys if isinstance(k, ast.Constant)}
                elif isinstance(keyword.value, ast.IfExp):  # **({"name": ...} if ... else {})
                    for branch in (keyword.value.body, keyword.value.orelse):
                        if isinstance(branch, ast.Dict):
                            names |= {k.value for k in branch.keys if isinstance(k, ast.Constant)}
                else:
                    dynamic = True
            found.append((f"{path.relative_to(ROOT)}:{node.lineno}", command, names, dynamic))
    return found


def test_every_call_the_project_makes_names_only_parameters_cloudstack_has():
    """CloudStack ignores a parameter it does not know (a WARN in its log):
    a misspelt name would do nothing, silently, in production."""
    calls = project_calls()
    assert {"createVolume", "attachVolume", "deployVirtualMachine", "createSnapshot", "listServiceOfferings",
            "revertSnapshot", "destroyVirtualMachine"} <= {c for _, c, _, _ in calls}
    wrong = []
    for where, command, names, dynamic in calls:
        if command not in API:
            wrong.append(f"{where}: {command} is not a CloudStack command the sheet lists")
            continue
        spec = API[command]
        wrong += [f"{where}: {command} has no parameter {name}" for name in sorted(names)
                  if name.lower() not in spec.params and name.lower() not in FRAMEWORK]
        if not dynamic:
            wrong += [f"{where}: {command} needs {name}" for name in spec.required() if name not in names]
    assert wrong == []
    # The commands the config check names by variable (client.check) are CloudStack's too.
    from replication.platforms.cloudstack import client

    checked = {node.value for node in ast.walk(ast.parse(Path(client.__file__).read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("list")}
    assert checked and checked <= set(API)


def signed_get(sim, **params) -> requests.Response:
    params = {"apiKey": sim.api_key, "response": "json", **{k: str(v) for k, v in params.items()}}
    params["signature"] = signature(params, sim.secret)
    return requests.get(sim.endpoint, params=params, timeout=10)


def test_the_simulator_answers_as_cloudstacks_api_layer_does(cloud):  # noqa: F811
    sim, secret = cloud
    # A required parameter missing: 431, CloudStack's envelope and text, before any job.
    answer = signed_get(sim, command="deployVirtualMachine", serviceofferingid=sim.service_offering["id"],
                        templateid=sim.template["id"])
    assert answer.status_code == 431
    assert answer.json() == {"deployvirtualmachineresponse": {
        "uuidList": [], "errorcode": 431, "cserrorcode": 9999,
        "errortext": "Unable to execute API command deployvirtualmachine due to missing parameter zoneid"}}
    assert signed_get(sim, command="attachVolume", id="x", virtualmachineid="").json()[
        "attachvolumeresponse"]["errortext"] == "Invalid value provided for API arg: virtualmachineid"
    # Names are matched lower-cased; one the command does not have is ignored (and recorded here).
    answer = signed_get(sim, command="listNetworks", ID=sim.network["id"], zoneId=sim.zone["id"], netwrokid="x")
    assert answer.status_code == 200
    assert [n["name"] for n in answer.json()["listnetworksresponse"]["network"]] == ["prod"]
    assert sim.unknown_params == [("listNetworks", "netwrokid")]
    sim.unknown_params.clear()
    # An empty list is {}; a command it does not have: 401 under errorresponse (API-key callers).
    assert signed_get(sim, command="listVolumes").json() == {"listvolumesresponse": {}}
    answer = signed_get(sim, command="listVolumez")
    assert answer.status_code == 401 and list(answer.json()) == ["errorresponse"]
    # A plain async command's first reply is its job only; a create command's names the new entity too.
    created = signed_get(sim, command="createVolume", name="v", zoneid=sim.zone["id"],
                         diskofferingid=sim.disk_offering["id"], size=1).json()["createvolumeresponse"]
    assert set(created) == {"id", "jobid"}
    client = CloudClient(add_cloud_config(sim, secret))
    client.call("queryAsyncJobResult", jobid=created["jobid"])  # waits for the job
    attached = signed_get(sim, command="attachVolume", id=created["id"],
                          virtualmachineid=sim.oma_vm["id"]).json()["attachvolumeresponse"]
    assert set(attached) == {"jobid"}
    # deployVirtualMachine keys iptonetworklist by network, as CloudStack's code does:
    # two entries for one network leave one NIC, the later one.
    client.call("deployVirtualMachine", serviceofferingid=sim.service_offering["id"], zoneid=sim.zone["id"],
                templateid=sim.template["id"], name="twice", startvm=False,
                iptonetworklist=[{"networkid": sim.network["id"], "mac": "02:aa:00:00:00:01"},
                                 {"networkid": sim.network["id"], "mac": "02:aa:00:00:00:02"}])
    vm = client.one("listVirtualMachines", "virtualmachine", name="twice")
    assert [n["macaddress"] for n in vm["nic"]] == ["02:aa:00:00:00:02"]
    with pytest.raises(CloudError, match="431 parameter error: bootmode must be specified for the VM with boot "
                                         r"type: UEFI. Valid values are: \[LEGACY, SECURE\]"):
        client.call("deployVirtualMachine", serviceofferingid=sim.service_offering["id"], zoneid=sim.zone["id"],
                    templateid=sim.template["id"], name="uefi", boottype="UEFI")
    with pytest.raises(CloudError, match="Mac address is not unicast: 03:aa:00:00:00:01"):
        client.call("deployVirtualMachine", serviceofferingid=sim.service_offering["id"], zoneid=sim.zone["id"],
                    templateid=sim.template["id"], name="mac",
                    iptonetworklist=[{"networkid": sim.network["id"], "mac": "03:aa:00:00:00:01"}])
    custom = sim.add_custom_offering()
    with pytest.raises(CloudError, match="Need to specify custom parameter values cpu, cpu speed and memory"):
        client.call("deployVirtualMachine", serviceofferingid=custom["id"], zoneid=sim.zone["id"],
                    templateid=sim.template["id"], name="custom", details={"cpuNumber": 2, "memory": 1024})
    assert sim.unknown_params == []


def add_cloud_config(sim, secret) -> CloudStackConfig:
    add_cloud(sim, secret)
    return CloudStackConfig.active()


# The destination ---------------------------------------------------------------------

def volume_on_the_oma(sim, client: CloudClient, name: str) -> str:
    """A CloudStack volume attached to the OMA, as a replica is."""
    volume = client.call("createVolume", name=name, zoneid=sim.zone["id"], diskofferingid=sim.disk_offering["id"],
                         size=1)["volume"]
    client.call("attachVolume", id=volume["id"], virtualmachineid=sim.oma_vm["id"])
    return volume["id"]


def destination(sim, secret, tmp_path) -> tuple[CloudStackDestination, CloudClient]:
    config = add_cloud_config(sim, secret)
    return (CloudStackDestination(config, job_timeout_s=10, settle_s=0.5, work_dir=tmp_path / "convert"),
            CloudClient(config))


def deploy_params(sim) -> dict[str, str]:
    (params,) = [p for command, p in sim.requests if command == "deployVirtualMachine"]
    return params


def test_a_two_nic_vm_keeps_both_nics_macs_and_ips_its_size_boot_type_and_disk_controller(cloud, tmp_path):  # noqa: F811
    sim, secret = cloud
    dest, client = destination(sim, secret, tmp_path)
    backend = next(n for n in sim.networks.values() if n["name"] == "backend")
    volume = volume_on_the_oma(sim, client, "web-disk-2000")
    (handle,) = dest.protect([volume], "pt")
    shape = VMShape(cpus=3, memory_mib=3000, firmware="efi", secure_boot=True, disk_bus="sata",
                    disks=("disk-2000",),
                    nics=(NIC(mac="00:50:56:AA:00:01", source_network="VM Network", ip="10.1.1.21"),
                          NIC(mac="00:50:56:aa:00:02", source_network="Backend", ip="10.2.2.22")))

    dest.define_vm("web01", shape, [(handle, "disk-2000")],
                   network={"VM Network": sim.network["id"], "Backend": backend["id"]})

    vm = client.one("listVirtualMachines", "virtualmachine", name="web01")
    assert [(n["networkname"], n["macaddress"], n["ipaddress"]) for n in vm["nic"]] == [
        ("prod", "00:50:56:aa:00:01", "10.1.1.21"), ("backend", "00:50:56:aa:00:02", "10.2.2.22")]
    # No fixed offering is 3 CPUs / 3000 MiB: the smallest that fits, and why.
    assert (vm["serviceofferingname"], vm["cpunumber"], vm["memory"]) == ("large", 4, 8192)
    assert (vm["boottype"], vm["bootmode"]) == ("UEFI", "SECURE")
    assert vm["details"] == {"rootDiskController": "sata", "dataDiskController": "sata"}
    params = deploy_params(sim)
    assert {k: v for k, v in params.items() if k.startswith("iptonetworklist")} == {
        "iptonetworklist[0].networkid": sim.network["id"], "iptonetworklist[0].mac": "00:50:56:aa:00:01",
        "iptonetworklist[0].ip": "10.1.1.21", "iptonetworklist[1].networkid": backend["id"],
        "iptonetworklist[1].mac": "00:50:56:aa:00:02", "iptonetworklist[1].ip": "10.2.2.22"}
    assert "networkids" not in params and params["startvm"] == "false"
    chosen = dest.hardware_choices("web01")
    assert chosen["service_offering"] == {
        "value": "large (4 CPU(s), 8192 MiB)", "id": vm["serviceofferingid"],
        "origin": "destination",
        "why": "the smallest fixed offering that fits the source's 3 CPU(s), 3000 MiB (no custom offering allows it)"}
    assert chosen["boottype"]["value"] == "UEFI SECURE" and chosen["rootdiskcontroller"]["value"] == "sata"
    # The replica volume is the VM's root disk now.
    assert client.one("listVolumes", "volume", id=volume)["vmname"] == "web01"
    assert sim.unknown_params == []

    # A cloud with a custom offering: the VM gets exactly its source's CPUs and memory.
    dest.destroy("web01")
    sim.requests.clear()
    sim.add_custom_offering(max_cpus=8, max_memory=16384)
    client.call("attachVolume", id=volume, virtualmachineid=sim.oma_vm["id"])
    dest.define_vm("web01", shape, [(handle, "disk-2000")],
                   network={"VM Network": sim.network["id"], "Backend": backend["id"]})
    vm = client.one("listVirtualMachines", "virtualmachine", name="web01")
    assert (vm["serviceofferingname"], vm["cpunumber"], vm["memory"]) == ("custom", 3, 3000)
    params = deploy_params(sim)
    assert (params["details[0].cpuNumber"], params["details[0].memory"], params["details[0].cpuSpeed"]) == (
        "3", "3000", "1000")
    assert dest.hardware_choices("web01")["service_offering"]["why"] == (
        "custom offering sized to the source's 3 CPU(s), 3000 MiB")


def test_nics_one_network_cannot_hold(cloud, tmp_path):  # noqa: F811
    """CloudStack gives a VM one NIC per network: two NICs mapped to one
    network are refused before a volume leaves the OMA; on a test failover's
    one network the first NIC joins and the others are recorded as left off."""
    sim, secret = cloud
    dest, client = destination(sim, secret, tmp_path)
    volume = volume_on_the_oma(sim, client, "db-disk-2000")
    (handle,) = dest.protect([volume], "pt")
    shape = VMShape(cpus=1, memory_mib=512, nics=(NIC(mac="00:50:56:aa:00:01", source_network="A", ip="10.1.1.5"),
                                                  NIC(mac="00:50:56:aa:00:02", source_network="B", ip="10.1.1.6")))

    with pytest.raises(DestinationError, match="NICs 00:50:56:aa:00:01 and 00:50:56:aa:00:02 both map to "
                                               f"CloudStack network {sim.network['id']}, and CloudStack gives a VM "
                                               "one NIC per network"):
        dest.define_vm("db01", shape, [(handle, "disk-2000")], network={"A": sim.network["id"],
                                                                        "B": sim.network["id"]})
    assert client.one("listVolumes", "volume", id=volume)["vmname"] == "oma-appliance"
    assert "deployVirtualMachine" not in sim.calls and "detachVolume" not in sim.calls
    # A live failover's preflight (before the source is touched) says the same.
    NetworkMapping.objects.create(source_network="A", destination_network=sim.network["id"])
    NetworkMapping.objects.create(source_network="B", destination_network=sim.network["id"])
    with pytest.raises(FailoverError, match="both map to CloudStack network .* one NIC per network"):
        production_network(shape, dest)

    dest.define_vm("db01-test", shape, [(handle, "disk-2000")])  # a test failover: the config's network
    vm = client.one("listVirtualMachines", "virtualmachine", name="db01-test")
    assert [(n["networkname"], n["macaddress"]) for n in vm["nic"]] == [("prod", "00:50:56:aa:00:01")]
    assert (vm["serviceofferingname"], vm["boottype"], vm["bootmode"]) == ("small", "BIOS", "LEGACY")
    assert vm["details"] == {"rootDiskController": "virtio", "dataDiskController": "virtio"}
    assert dest.hardware_choices("db01-test")["nics"]["why"] == (
        "the source's first NIC, with its MAC, on the test network (its IP is the test network's); NIC(s) "
        "00:50:56:aa:00:02 left off: CloudStack gives a VM one NIC per network and a test failover has one")


def test_the_guest_is_converted_on_the_omas_devices_and_only_there(cloud, tmp_path):  # noqa: F811
    sim, secret = cloud
    dest, client = destination(sim, secret, tmp_path)
    volume = volume_on_the_oma(sim, client, "app-disk-2000")
    (handle,) = dest.protect([volume], "pt")
    shape = VMShape(cpus=1, memory_mib=512)
    device = sim.by_id_dir / device_name(volume)
    calls_before = len(sim.calls)

    # A blank disk: virt-v2v-in-place opens the device and finds no OS in it.
    with pytest.raises(GuestNotConverted, match=rf"No root device found in this operating system image\..*"
                                                rf"\(virt-v2v-in-place on the OMA's {device}\)"):
        dest.convert_guest("app01", shape, [(handle, "disk-2000")])
    # Read calls only: nothing left the OMA for the conversion.
    assert set(sim.calls[calls_before:]) <= {"listSnapshots", "listVolumes"}
    assert client.one("listVolumes", "volume", id=volume)["vmname"] == "oma-appliance"

    dest.define_vm("app01", shape, [(handle, "disk-2000")])
    with pytest.raises(DestinationError, match=f"volume {volume} \\(disk-2000\\) is not attached to the OMA"):
        dest.convert_guest("app01", shape, [(handle, "disk-2000")])


# A failover ---------------------------------------------------------------------------

def test_a_cloudstack_test_failover_converts_before_the_volumes_leave_the_oma_and_records_its_offering(
        celery_worker_process, cloud, tmp_path, settings):  # noqa: F811
    sim, secret = cloud
    add_cloud(sim, secret)
    vm = image_vm_on_cloud(tmp_path, "vm-cloud-convert", settings)
    job = wait_for_job(start_replication(vm).id, timeout=120)
    assert job.status == JobStatus.COMPLETED, job.error_message
    volume = job.disks.get().target_volume
    call_command("set_guest_conversion", vm.name, "on", stdout=StringIO())
    sim.calls.clear()

    out = StringIO()
    call_command("failover", vm.name, "--test", "--wait", "--json", stdout=out)
    report = json.loads(out.getvalue())

    assert report["status"] == "succeeded", report
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["preflight", "protect volumes", "convert guest", "define VM", "start VM", "verify boot"]
    device = sim.by_id_dir / device_name(volume.cloud_volume_id)
    # The conversion ran on the replica's device on the OMA (the image holds no OS: not converted, says why)...
    assert steps["convert guest"]["detail"].startswith("not converted: inspection could not detect the source guest")
    assert steps["convert guest"]["detail"].endswith(f"(virt-v2v-in-place on the OMA's {device})")
    # ... before anything left the OMA: the first detach is define VM's.
    assert sim.calls.index("detachVolume") > sim.calls.index("createSnapshot")
    failover = FailoverJob.objects.get(pk=report["id"])
    assert failover.steps.get(name="convert guest").ended_at <= failover.steps.get(name="define VM").started_at
    assert failover.hardware["service_offering"] == {
        "value": "small (1 CPU(s), 512 MiB)", "id": next(o["id"] for o in sim.offerings.values()
                                                         if o["name"] == "small"),
        "origin": "destination",
        "why": "the smallest fixed offering that fits the source's 1 CPU(s), 512 MiB (no custom offering allows it)"}
    assert "service_offering: small" in steps["define VM"]["detail"]
    assert sim.unknown_params == []
    call_command("failover_end", vm.name, stdout=StringIO())
