"""A CloudStack API simulator for the tests: a test double, because no
CloudStack can run here. It stands in for a real management server as far as
this project uses one, and behaves like it where that matters. It is held to
CloudStack's own API as simulators/cloudstack_api.py encodes it (read from
CloudStack's source: every call the project makes, its parameters by wire
name, type and whether required, sync or async):

- parameter names are matched as CloudStack matches them (lower-cased; a
  map's `name[i].field` by its name); a required one missing is refused with
  431 `... due to missing parameter <name>` (empty: `Invalid value provided
  for API arg`); a name the command does not have is ignored, as CloudStack
  ignores it, and recorded in `unknown_params` (the tests fail on any); a
  command it does not know is refused with 401 under `errorresponse`, as
  CloudStack refuses one with API-key authentication;

- requests are authenticated as CloudStack does: the API key must be known,
  and the signature is checked (HMAC-SHA1 with the secret over the request's
  parameters but `signature`, sorted by name, values URL-encoded as Java's
  URLEncoder does with spaces as %20, the whole string lower-cased, base64);
  signatureVersion 3 requests carry `expires`, refused once past;
- answers have the real API's shapes: one top-level key `<command>response`
  (lower-cased), list calls `{"count": n, "<item>": [...]}` or `{}` when
  empty, async calls `{"id", "jobid"}` followed by queryAsyncJobResult
  (jobstatus 0 pending, 1 done with `jobresult`, 2 failed with `jobresult`
  {errorcode, errortext}); errors are HTTP `errorcode` with
  `{"errorcode", "cserrorcode", "errortext", "uuidList"}`, using CloudStack's
  codes (401 unauthorized, 431 parameter error, 530 internal error, 533
  insufficient capacity, 536 resource in use);
- async jobs finish later (JOB_DELAY_S), from a timer thread;
- it keeps state: zones, offerings (fixed ones; a custom one with
  `add_custom_offering`), networks, templates, VMs (among them the OMA's
  own) with their NICs, boot type and details, volumes with their data
  (sparse files) and attachments, snapshots;
- deployVirtualMachine checks what CloudStack checks before its job: the
  offering (a custom one needs details cpuNumber, cpuSpeed and memory; a
  fixed one refuses them), boottype/bootmode (UEFI needs a bootmode),
  `details` merged flat from every index, `iptonetworklist` not with
  `networkids`, a MAC valid and unicast, an IP inside its network's CIDR;
  and, as CloudStack's own code does, it keys `iptonetworklist` by network:
  two entries for one network leave one NIC (the later entry's).

Not modelled: accounts and domains, projects, paging, XML replies, the
hypervisor (a VM "runs" once started; its disks are not booted).

Attaching a volume to the OMA's VM makes its "block device" appear where the
guest would see it, `<by_id_dir>/virtio-<first 20 hex digits of the volume
id>` (a symlink to the volume's data file), so the NBD export and the copies
are real; detaching removes it.

Faults to inject (attributes, set from the test): `fail_jobs[command] =
(errorcode, errortext)` fails that command's next async job; `hang_jobs`
(a set of commands) leaves their jobs pending forever; `zone_capacity_bytes`
refuses createVolume beyond it (533); `kvm_snapshot_enabled = False` is a
cloud with CloudStack's default for kvm.snapshot.enabled (no snapshot of a
volume attached to a running VM).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import re
import subprocess
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlparse

from simulators.cloudstack_api import API, FRAMEWORK, wire_name

GiB = 1024**3
JOB_DELAY_S = 0.2
MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


class ApiError(Exception):
    def __init__(self, code: int, text: str, cs_code: int = 9999):
        super().__init__(text)
        self.code, self.text, self.cs_code = code, text, cs_code


def sparse_copy(src: Path, dst: Path) -> None:
    """A volume's data as a primary storage snapshot keeps it: holes stay holes."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def java_urlencode(value: str) -> str:
    return quote(value, safe="*-._").replace("~", "%7E")


def signature(params: dict[str, str], secret: str) -> str:
    text = "&".join(f"{k}={java_urlencode(v)}" for k, v in sorted(params.items()) if k != "signature")
    digest = hmac.new(secret.encode(), text.lower().encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class SnapshotCommands:
    """listSnapshots, createSnapshot, revertSnapshot, deleteSnapshot, and
    listCapabilities (which says whether KVM snapshots of a running VM's
    volume are allowed), with CloudStack's rules for KVM:

    - createSnapshot allocates the snapshot at once (listed, state Allocated)
      and its job backs it up (state BackedUp, with physicalsize: the bytes
      the copy takes, and virtualsize: the volume's size); a failed job
      leaves it in state Error. A volume attached to a VM that is not
      stopped is refused (530) unless the cloud's kvm.snapshot.enabled is
      true (`kvm_snapshot_enabled`);
    - revertSnapshot needs the volume Ready and, when it is attached, its VM
      stopped (431 "The VM the specified disk is attached to is not in the
      shutdown state."), and a snapshot that is backed up;
    - an unknown id is refused as CloudStack's API layer refuses it (431).
    """

    def _cmd_listCapabilities(self, params):
        return {"capability": {"cloudstackversion": "4.19.1.0", "kvmsnapshotenabled": self.kvm_snapshot_enabled,
                               "securitygroupsenabled": False, "userpublictemplateenabled": True,
                               "allowusercreateprojects": True, "customdiskofferingminsize": 1,
                               "customdiskofferingmaxsize": 1024}}

    def _cmd_listSnapshots(self, params):
        rows = self._by_id(list(self.snapshots.values()), params)
        if "volumeid" in params:
            rows = [s for s in rows if s["volumeid"] == params["volumeid"]]
        if "name" in params:
            rows = [s for s in rows if s["name"] == params["name"]]
        return self._listing("snapshot", [dict(s) for s in rows])

    def snapshot_file(self, snapshot_id: str) -> Path:
        return self.data_dir / f"snapshot-{snapshot_id}.img"

    @staticmethod
    def _invalid(command: str, param: str, value: str) -> ApiError:
        """What CloudStack answers for an id that names nothing (its API
        layer cannot map the uuid to an entity)."""
        return ApiError(431, f"Unable to execute API command {command.lower()} due to invalid value. Invalid "
                             f"parameter {param} value={value} due to incorrect long value format, or entity does "
                             "not exist or due to incorrect parameter annotation for the field in api cmd class.",
                        4350)

    def _check_snapshottable(self, volume: dict) -> None:
        if volume.get("state") != "Ready":
            raise ApiError(431, "Volume is not in ready state", 4350)
        vm = self.vms.get(volume.get("virtualmachineid") or "")
        if vm is not None and vm["state"] not in ("Stopped", "Destroyed") and not self.kvm_snapshot_enabled:
            raise ApiError(530, "KVM Snapshot is not supported for Running VMs. It is disabled by default due to a "
                                "possible volume corruption in certain cases. To enable it set global settings "
                                "kvm.snapshot.enabled to True. See the documentation for more details.", 4250)

    def _cmd_createSnapshot(self, params):
        volume = self.volumes.get(params["volumeid"])
        if volume is None:
            raise self._invalid("createSnapshot", "volumeid", params["volumeid"])
        self._check_snapshottable(volume)
        snapshot_id = str(uuid.uuid4())
        snapshot = {"id": snapshot_id, "name": params.get("name") or f"{volume['name']}-snap",
                    "volumeid": volume["id"], "volumename": volume["name"], "volumetype": volume["type"],
                    "state": "Allocated", "snapshottype": "MANUAL", "intervaltype": "MANUAL",
                    "locationtype": "SECONDARY", "revertable": True, "physicalsize": 0,
                    "virtualsize": volume["size"], "zoneid": self.zone["id"],
                    "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.snapshots[snapshot_id] = snapshot

        def run():
            path = self.snapshot_file(snapshot_id)
            sparse_copy(self.volume_file(volume["id"]), path)
            snapshot.update(state="BackedUp", physicalsize=path.stat().st_blocks * 512)
            return {"snapshot": dict(snapshot)}

        def failed():
            snapshot["state"] = "Error"

        return snapshot_id, run, failed

    def _snapshot(self, command: str, snapshot_id: str) -> dict:
        snapshot = self.snapshots.get(snapshot_id)
        if snapshot is None:
            raise self._invalid(command, "id", snapshot_id)
        return snapshot

    def _cmd_revertSnapshot(self, params):
        snapshot = self._snapshot("revertSnapshot", params["id"])
        volume = self.volumes.get(snapshot["volumeid"])
        if volume is None or volume.get("state") != "Ready":
            raise ApiError(431, "The volume is not in Ready state.", 4350)
        vm = self.vms.get(volume.get("virtualmachineid") or "")
        if vm is not None and vm["state"] != "Stopped":
            raise ApiError(431, "The VM the specified disk is attached to is not in the shutdown state.", 4350)
        if snapshot["state"] != "BackedUp":
            raise ApiError(530, f"snapshot:{snapshot['id']} not exist in data store", 4250)

        def run():
            # In place, as the hypervisor's copy does: the volume keeps its file.
            sparse_copy(self.snapshot_file(snapshot["id"]), self.volume_file(volume["id"]))
            return {"snapshot": dict(snapshot)}

        return snapshot["id"], run

    def _cmd_deleteSnapshot(self, params):
        snapshot = self._snapshot("deleteSnapshot", params["id"])

        def run():
            self.snapshots.pop(snapshot["id"], None)
            self.snapshot_file(snapshot["id"]).unlink(missing_ok=True)
            return {"success": True}

        return snapshot["id"], run


class VMCommands:
    """deployVirtualMachine, start, stop and destroyVirtualMachine."""

    def _vm(self, vm_id: str) -> dict:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise ApiError(431, f"Unable to find virtual machine with id {vm_id}", 4350)
        return vm

    def _cmd_deployVirtualMachine(self, params):
        """What CloudStack checks before it queues the job (its create()
        step), then the job: the VM with its NICs, offering, boot type and
        details, and a template root volume."""
        offering = self.offerings.get(params["serviceofferingid"])
        if offering is None:
            raise self._invalid("deployVirtualMachine", "serviceofferingid", params["serviceofferingid"])
        if params.get("templateid") != self.template["id"]:
            raise ApiError(431, f"Unable to find template by id {params.get('templateid')}", 4350)
        details = self._map_flat(params, "details")
        if any(key.startswith("extraconfig") for key in details):
            raise ApiError(431, "'extraconfig' should not be included in details as key", 4350)
        cpus, memory, speed = self._sized_by(offering, details)
        boot = self._boot(params)
        nics = self._deploy_nics(params)
        name = params.get("name") or f"VM-{uuid.uuid4()}"
        if any(v["name"] == name for v in self.vms.values()):
            raise ApiError(431, f"The vm with hostname {name} already exists", 4350)
        vm = self._new_vm(name, state="Starting", templateid=self.template["id"], serviceofferingid=offering["id"],
                          serviceofferingname=offering["name"], cpunumber=cpus, memory=memory, cpuspeed=speed,
                          nic=nics, details=details, **boot)

        def run():
            root_id = str(uuid.uuid4())
            with open(self.volume_file(root_id), "wb") as f:
                f.truncate(GiB)
            self.volumes[root_id] = {"id": root_id, "name": f"ROOT-{name}", "zoneid": self.zone["id"],
                                     "type": "ROOT", "size": GiB, "state": "Ready", "virtualmachineid": vm["id"],
                                     "vmname": name, "deviceid": 0}
            vm["state"] = "Running" if params.get("startvm", "true").lower() == "true" else "Stopped"
            self.vms[vm["id"]] = vm
            return {"virtualmachine": dict(vm)}

        return vm["id"], run

    @staticmethod
    def _map_flat(params: dict[str, str], name: str) -> dict[str, str]:
        """A `details`-style map as CloudStack reads it: every field of every
        index merged into one map."""
        flat = {}
        for key, value in params.items():
            if key.startswith(f"{name}[") and "]." in key:
                flat[key.split("].", 1)[1]] = value
        return flat

    @staticmethod
    def _map_entries(params: dict[str, str], name: str) -> list[dict[str, str]]:
        """An indexed map (`name[i].field`), one dict per index in index order."""
        entries: dict[int, dict[str, str]] = {}
        for key, value in params.items():
            match = re.fullmatch(rf"{name}\[(\d+)\]\.(.+)", key)
            if match:
                entries.setdefault(int(match.group(1)), {})[match.group(2).lower()] = value
        return [entries[i] for i in sorted(entries)]

    @staticmethod
    def _sized_by(offering: dict, details: dict[str, str]) -> tuple[int, int, int]:
        """CPUs, memory (MB) and CPU speed (MHz): a fixed offering's own, or
        a custom offering's from details cpuNumber, cpuSpeed, memory."""
        keys = ("cpuNumber", "cpuSpeed", "memory")
        if not offering.get("iscustomized"):
            if "cpuNumber" in details:
                raise ApiError(431, f"The cpu cores of this offering id:{offering['id']} is not customizable. This "
                                    "is predefined in the template.", 4350)
            if "memory" in details:
                raise ApiError(431, f"The memory of this offering id:{offering['id']} is not customizable. This is "
                                    "predefined in the template.", 4350)
            return offering["cpunumber"], offering["memory"], offering.get("cpuspeed", 1000)
        if any(not details.get(k) for k in keys):
            raise ApiError(431, "Need to specify custom parameter values cpu, cpu speed and memory when using "
                                "custom offering", 4350)
        try:
            cpus, speed, memory = (int(details[k]) for k in keys)
        except ValueError:
            raise ApiError(431, "Invalid cpu cores, cpu speed or memory value: not a number", 4350) from None
        limits = offering.get("serviceofferingdetails") or {}
        low, high = int(limits.get("mincpunumber", 1)), int(limits.get("maxcpunumber", 2**31))
        if not low <= cpus <= high:
            raise ApiError(431, f"Invalid cpu cores value, specify a value between {low} and {high}", 4350)
        low, high = int(limits.get("minmemory", 32)), int(limits.get("maxmemory", 2**31))
        if not low <= memory <= high:
            raise ApiError(431, f"Invalid memory value, specify a value between {low} and {high}", 4350)
        return cpus, memory, speed

    @staticmethod
    def _boot(params: dict[str, str]) -> dict[str, str]:
        boot_type, boot_mode = params.get("boottype", ""), params.get("bootmode", "")
        if not boot_type:
            return {"boottype": "BIOS", "bootmode": "LEGACY"}
        if boot_type.upper() not in ("BIOS", "UEFI"):
            raise ApiError(431, f"Invalid bootType {boot_type}Valid values are: [BIOS, UEFI]", 4350)
        if boot_mode and boot_mode.upper() not in ("LEGACY", "SECURE"):
            raise ApiError(431, f"Invalid bootmode: {boot_mode} specified for VM: . Valid values are: "
                                "[LEGACY, SECURE]", 4350)
        if boot_type.upper() == "UEFI" and not boot_mode:
            raise ApiError(431, "bootmode must be specified for the VM with boot type: UEFI. Valid values are: "
                                "[LEGACY, SECURE]", 4350)
        return {"boottype": boot_type.upper(), "bootmode": (boot_mode or "LEGACY").upper()}

    def _deploy_nics(self, params: dict[str, str]) -> list[dict]:
        """The VM's NICs from networkids, or from iptonetworklist keyed by
        network as CloudStack keys it (a second entry for a network replaces
        the first: one NIC per network)."""
        entries = self._map_entries(params, "iptonetworklist")
        if entries and (params.get("networkids") or params.get("ipaddress")):
            raise ApiError(431, "NetworkIds and ipAddress can't be specified along with ipToNetworkMap parameter",
                           4350)
        by_network: dict[str, dict] = {}
        for entry in entries or [{"networkid": n} for n in params.get("networkids", "").split(",") if n]:
            network = self.networks.get(entry.get("networkid", ""))
            if network is None:
                raise self._invalid("deployVirtualMachine", "iptonetworklist", entry.get("networkid", ""))
            mac = entry.get("mac")
            if mac is not None:
                if not MAC_RE.match(mac):
                    raise ApiError(431, f"Mac address is not valid: {mac}", 4350)
                if int(mac[:2], 16) & 1:
                    raise ApiError(431, f"Mac address is not unicast: {mac}", 4350)
            ip = entry.get("ip")
            if ip is not None:
                try:
                    inside = ipaddress.ip_address(ip) in ipaddress.ip_network(network["cidr"])
                except ValueError:
                    inside = False
                if not inside:
                    raise ApiError(431, f"Invalid ip address {ip}: not in the CIDR {network['cidr']} of network "
                                        f"{network['name']}", 4350)
            by_network[network["id"]] = {"networkid": network["id"], "networkname": network["name"],
                                         "macaddress": mac, "ipaddress": ip}
        nics = []
        for device, nic in enumerate(by_network.values()):
            self._mac_counter += 1
            nic["macaddress"] = (nic["macaddress"] or f"02:00:00:00:{self._mac_counter >> 8:02x}:"
                                 f"{self._mac_counter & 0xff:02x}").lower()
            network = ipaddress.ip_network(self.networks[nic["networkid"]]["cidr"])
            nic["ipaddress"] = nic["ipaddress"] or str(network.network_address + 100 + self._mac_counter)
            nics.append({"id": str(uuid.uuid4()), "deviceid": str(device), "isdefault": device == 0, **nic})
        return nics

    def _cmd_startVirtualMachine(self, params):
        vm = self._vm(params["id"])
        if not any(v.get("deviceid") == 0 for v in self.attached_to(vm["id"])):
            raise ApiError(530, f"VM {vm['name']} has no ROOT volume: unable to start", 4250)

        def run():
            vm["state"] = "Running"
            return {"virtualmachine": dict(vm)}

        return vm["id"], run

    def _cmd_stopVirtualMachine(self, params):
        vm = self._vm(params["id"])

        def run():
            vm["state"] = "Stopped"
            return {"virtualmachine": dict(vm)}

        return vm["id"], run

    def _cmd_destroyVirtualMachine(self, params):
        """As CloudStack does: the VM's ROOT volume goes with it; data volumes
        are detached and kept."""
        vm = self._vm(params["id"])
        if vm["id"] == self.oma_vm["id"]:
            raise ApiError(431, "refusing to destroy the OMA in a test", 4350)

        def run():
            for volume in self.attached_to(vm["id"]):
                if volume.get("deviceid") == 0:
                    self.volumes.pop(volume["id"], None)
                    self.volume_file(volume["id"]).unlink(missing_ok=True)
                else:
                    for key in ("virtualmachineid", "vmname", "deviceid"):
                        volume.pop(key, None)
            vm["state"] = "Expunging" if params.get("expunge") == "true" else "Destroyed"
            if params.get("expunge") == "true":
                self.vms.pop(vm["id"], None)
            return {"virtualmachine": dict(vm)}

        return vm["id"], run


class CloudStackSimulator(SnapshotCommands, VMCommands):
    def __init__(self, root: Path, by_id_dir: Path, api_key: str = "sim-api-key", secret: str = "sim-secret-key"):
        self.root = Path(root)
        self.data_dir = self.root / "volumes"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.by_id_dir = Path(by_id_dir)
        self.by_id_dir.mkdir(parents=True, exist_ok=True)
        self.api_key, self.secret = api_key, secret
        self.lock = threading.RLock()
        self.calls: list[str] = []
        # Every request as the API layer saw it (parameter names matched as
        # CloudStack matches them), and the names it ignored as unknown.
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.unknown_params: list[tuple[str, str]] = []
        self._mac_counter = 0
        self.fail_jobs: dict[str, tuple[int, str]] = {}
        self.hang_jobs: set[str] = set()
        self.zone_capacity_bytes: int | None = None
        # The global setting kvm.snapshot.enabled (CloudStack's default is
        # false); the OMA's volumes hang on a running VM, the OMA, and the
        # destination's protect snapshots them there, so this cloud has it on.
        self.kvm_snapshot_enabled = True
        self.zone_memory_bytes = 64 * GiB  # listCapacity type 0
        self.zone = {"id": str(uuid.uuid4()), "name": "zone1", "allocationstate": "Enabled",
                     "networktype": "Advanced"}
        self.disk_offering = {"id": str(uuid.uuid4()), "name": "custom", "iscustomized": True, "disksize": 0,
                              "storagetype": "shared"}
        # Fixed offerings; the config's is "medium". A custom one: add_custom_offering.
        self.offerings = {o["id"]: o for o in (
            {"id": str(uuid.uuid4()), "name": name, "cpunumber": cpus, "memory": memory, "cpuspeed": 1000,
             "iscustomized": False, "state": "Active"}
            for name, cpus, memory in (("small", 1, 512), ("medium", 2, 2048), ("large", 4, 8192)))}
        self.service_offering = next(o for o in self.offerings.values() if o["name"] == "medium")
        self.networks = {n["id"]: n for n in (
            {"id": str(uuid.uuid4()), "name": name, "zoneid": self.zone["id"], "state": "Implemented",
             "cidr": cidr, "type": "Isolated"}
            for name, cidr in (("prod", "10.1.1.0/24"), ("backend", "10.2.2.0/24")))}
        self.network = next(n for n in self.networks.values() if n["name"] == "prod")
        self.template = {"id": str(uuid.uuid4()), "name": "blank-bios", "zoneid": self.zone["id"],
                         "isready": True, "ostypename": "Other Linux (64-bit)"}
        self.oma_vm = self._new_vm("oma-appliance", state="Running")
        self.vms: dict[str, dict] = {self.oma_vm["id"]: self.oma_vm}
        self.volumes: dict[str, dict] = {}
        self.snapshots: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self._timers: list[threading.Timer] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/client/api"

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    # -- state -----------------------------------------------------------------

    def _new_vm(self, name: str, state: str = "Stopped", **extra) -> dict:
        return {"id": str(uuid.uuid4()), "name": name, "displayname": name, "state": state,
                "zoneid": self.zone["id"], "serviceofferingid": self.service_offering["id"], **extra}

    def add_custom_offering(self, min_cpus: int = 1, max_cpus: int = 16, min_memory: int = 256,
                            max_memory: int = 65536) -> dict:
        """A custom offering (no CPU, speed or memory of its own: the deploy
        gives them), within these bounds."""
        offering = {"id": str(uuid.uuid4()), "name": "custom", "iscustomized": True, "state": "Active",
                    "serviceofferingdetails": {"mincpunumber": str(min_cpus), "maxcpunumber": str(max_cpus),
                                               "minmemory": str(min_memory), "maxmemory": str(max_memory)}}
        self.offerings[offering["id"]] = offering
        return offering

    def device_path(self, volume_id: str) -> Path:
        return self.by_id_dir / f"virtio-{volume_id.replace('-', '')[:20]}"

    def volume_file(self, volume_id: str) -> Path:
        return self.data_dir / f"{volume_id}.img"

    def attached_to(self, vm_id: str) -> list[dict]:
        return sorted((v for v in self.volumes.values() if v.get("virtualmachineid") == vm_id),
                      key=lambda v: v.get("deviceid", 0))

    # -- HTTP ------------------------------------------------------------------

    def _handler(self):
        sim = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._answer(dict(parse_qsl(urlparse(self.path).query, keep_blank_values=True)))

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                self._answer(dict(parse_qsl(body, keep_blank_values=True)))

            def _answer(self, params: dict[str, str]):
                command = params.get("command", "")
                key = f"{command.lower()}response"
                try:
                    if command not in API or not hasattr(sim, f"_cmd_{command}") and command != "queryAsyncJobResult":
                        key = "errorresponse"  # CloudStack checks the command map before the signature
                        raise ApiError(401, "unable to verify user credentials and/or request signature", 9999)
                    sim._authenticate(params)
                    status, payload = 200, sim._dispatch(command, sim._checked(command, params))
                except ApiError as exc:
                    status = exc.code
                    payload = {"uuidList": [], "errorcode": exc.code, "cserrorcode": exc.cs_code,
                               "errortext": exc.text}
                data = json.dumps({key: payload}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): as a real server, carry on

        return Handler

    def _authenticate(self, params: dict[str, str]) -> None:
        if params.get("apiKey") != self.api_key or "signature" not in params:
            raise ApiError(401, "unable to verify user credentials and/or request signature", 9999)
        if not hmac.compare_digest(signature(params, self.secret), params["signature"]):
            raise ApiError(401, "unable to verify user credentials and/or request signature", 9999)
        if params.get("signatureVersion") == "3":
            try:
                expires = datetime.strptime(params["expires"], "%Y-%m-%dT%H:%M:%S%z")
            except (KeyError, ValueError):
                raise ApiError(401, "missing or malformed expires parameter", 9999) from None
            if expires < datetime.now(UTC):
                raise ApiError(401, "signature expired", 9999)

    def _checked(self, command: str, raw: dict[str, str]) -> dict[str, str]:
        """The parameters as CloudStack's API layer hands them on: names
        lower-cased (a map's fields keep their case), a required one missing
        or empty refused with 431, an unknown one ignored (and recorded)."""
        params = {}
        for key, value in raw.items():
            name = wire_name(key)
            params[name + key[len(name):] if "[" in key else name] = value
        spec = API[command]
        with self.lock:
            self.requests.append((command, dict(params)))
            for key in params:
                name = wire_name(key)
                if name not in spec.params and name not in FRAMEWORK and name not in ("id", "page", "pagesize"):
                    self.unknown_params.append((command, key))
        for name in spec.required():
            if name not in params and not any(k.startswith(f"{name}[") for k in params):
                raise ApiError(431, f"Unable to execute API command {command.lower()} due to missing parameter "
                                    f"{name}", 9999)
            if name in params and not params[name]:
                raise ApiError(431, f"Invalid value provided for API arg: {name}", 9999)
        return params

    def _dispatch(self, command: str, params: dict[str, str]) -> dict:
        with self.lock:
            self.calls.append(command)
            if command == "queryAsyncJobResult":
                return self._job_result(params)
            handler = getattr(self, f"_cmd_{command}")
            mode = API[command].mode
            if mode == "sync":
                return handler(params)
            target, run, *failed = handler(params)
            job = self._start_job(command, target, run, *failed)
            # A create command's first reply names the new entity; the others' only the job.
            return job if mode == "async-create" else {"jobid": job["jobid"]}

    # -- async jobs ------------------------------------------------------------

    def _start_job(self, command: str, target: str | None, run, failed=None) -> dict:
        job_id = str(uuid.uuid4())
        job = {"jobid": job_id, "cmd": command, "jobstatus": 0, "jobresultcode": 0, "jobprocstatus": 0,
               "jobinstanceid": target, "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.jobs[job_id] = job
        if command not in self.hang_jobs:
            timer = threading.Timer(JOB_DELAY_S, self._finish_job, args=(job, command, run, failed))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
        return {"jobid": job_id, **({"id": target} if target else {})}

    def _finish_job(self, job: dict, command: str, run, failed=None) -> None:
        with self.lock:
            failure = self.fail_jobs.pop(command, None)
            try:
                if failure:
                    raise ApiError(*failure)
                result = run()
                job.update(jobstatus=1, jobresultcode=0, jobresulttype="object", jobresult=result)
            except ApiError as exc:
                if failed is not None:
                    failed()  # what the failed job leaves behind (a snapshot in state Error)
                job.update(jobstatus=2, jobresultcode=exc.code, jobresulttype="object",
                           jobresult={"errorcode": exc.code, "errortext": exc.text})

    def _job_result(self, params: dict[str, str]) -> dict:
        job = self.jobs.get(params.get("jobid", ""))
        if job is None:
            raise ApiError(431, f"Unable to execute API command queryasyncjobresult due to invalid value. "
                                f"Invalid parameter jobid value={params.get('jobid')} due to incorrect long value "
                                "format, or entity does not exist or due to incorrect parameter annotation for "
                                "the field in api cmd class.", 4350)
        return dict(job)

    # -- commands --------------------------------------------------------------

    @staticmethod
    def _listing(item: str, rows: list[dict]) -> dict:
        return {"count": len(rows), item: rows} if rows else {}

    @staticmethod
    def _by_id(rows: list[dict], params: dict[str, str]) -> list[dict]:
        return [r for r in rows if "id" not in params or r["id"] == params["id"]]

    def _cmd_listZones(self, params):
        return self._listing("zone", self._by_id([self.zone], params))

    def _cmd_listDiskOfferings(self, params):
        return self._listing("diskoffering", self._by_id([self.disk_offering], params))

    def _cmd_listServiceOfferings(self, params):
        return self._listing("serviceoffering", [dict(o) for o in self._by_id(list(self.offerings.values()),
                                                                                params)])

    def _cmd_listNetworks(self, params):
        return self._listing("network", [dict(n) for n in self._by_id(list(self.networks.values()), params)])

    def _cmd_listTemplates(self, params):
        return self._listing("template", self._by_id([self.template], params))

    def _cmd_listVirtualMachines(self, params):
        rows = self._by_id(list(self.vms.values()), params)
        if "name" in params:
            rows = [v for v in rows if v["name"] == params["name"]]
        return self._listing("virtualmachine", [dict(v) for v in rows])

    def _cmd_listCapacity(self, params):
        """Memory (type 0) of the zone: what the running VMs' offerings take."""
        used = sum(v.get("memory", self.service_offering["memory"]) * 2**20 for v in self.vms.values()
                   if v["state"] in ("Running", "Starting") and v["id"] != self.oma_vm["id"])
        rows = [{"type": 0, "name": "MEMORY", "zoneid": self.zone["id"], "zonename": self.zone["name"],
                 "capacitytotal": self.zone_memory_bytes, "capacityused": used,
                 "percentused": f"{100 * used / self.zone_memory_bytes:.2f}"}]
        if params.get("type") not in (None, "0"):
            rows = []
        return self._listing("capacity", rows)

    def _cmd_listVolumes(self, params):
        rows = self._by_id(list(self.volumes.values()), params)
        if "virtualmachineid" in params:
            rows = [v for v in rows if v.get("virtualmachineid") == params["virtualmachineid"]]
        return self._listing("volume", [dict(v) for v in rows])

    def _require(self, params, *names):
        for name in names:
            if not params.get(name):
                raise ApiError(431, f"Unable to execute API command {params['command'].lower()} due to missing "
                                    f"parameter {name}", 4350)

    def _volume(self, volume_id: str) -> dict:
        volume = self.volumes.get(volume_id)
        if volume is None:
            raise ApiError(431, f"Unable to find volume with id {volume_id}", 4350)
        return volume

    def _cmd_createVolume(self, params):
        if not params.get("diskofferingid") and not params.get("snapshotid"):
            raise ApiError(431, "Either disk Offering Id or snapshot Id must be passed whilst creating volume", 4350)
        self._require(params, "zoneid")  # a volume from a disk offering needs its zone
        if params["zoneid"] != self.zone["id"]:
            raise ApiError(431, f"Unable to find zone by id {params['zoneid']}", 4350)
        if params["diskofferingid"] != self.disk_offering["id"]:
            raise ApiError(431, f"Unable to find disk offering by id {params['diskofferingid']}", 4350)
        self._require(params, "size")  # a customized offering: the size in GB
        size = int(params["size"]) * GiB
        used = sum(v["size"] for v in self.volumes.values())
        if self.zone_capacity_bytes is not None and used + size > self.zone_capacity_bytes:
            raise ApiError(533, f"Insufficient capacity: zone {self.zone['name']} has "
                                f"{(self.zone_capacity_bytes - used) // GiB} GB of primary storage left", 4250)
        volume_id = str(uuid.uuid4())
        volume = {"id": volume_id, "name": params["name"], "zoneid": self.zone["id"], "zonename": self.zone["name"],
                  "type": "DATADISK", "size": size, "diskofferingid": self.disk_offering["id"],
                  "state": "Allocated", "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S%z")}

        def run():
            with open(self.volume_file(volume_id), "wb") as f:
                f.truncate(size)
            volume["state"] = "Ready"
            self.volumes[volume_id] = volume
            return {"volume": dict(volume)}

        return volume_id, run

    def _cmd_attachVolume(self, params):
        volume = self._volume(params["id"])
        vm = self.vms.get(params["virtualmachineid"])
        if vm is None:
            raise ApiError(431, f"Unable to find virtual machine by id {params['virtualmachineid']}", 4350)
        if volume.get("virtualmachineid"):
            raise ApiError(431, f"Please specify a volume that is not attached to any VM: {volume['name']} is "
                                f"attached to VM {volume['vmname']}", 4350)

        if params.get("deviceid") == "0":
            if vm["state"] != "Stopped":
                raise ApiError(431, f"VM {vm['name']} must be stopped to attach a ROOT volume", 4350)
            if any(v.get("deviceid") == 0 for v in self.attached_to(vm["id"])):
                raise ApiError(431, f"VM {vm['name']} already has a ROOT volume at device 0", 4350)

        def run():
            used = {v.get("deviceid") for v in self.attached_to(vm["id"])}
            device = int(params["deviceid"]) if params.get("deviceid") else min(set(range(1, 16)) - used)
            volume.update(virtualmachineid=vm["id"], vmname=vm["name"], deviceid=device,
                          type="ROOT" if device == 0 else "DATADISK")
            if vm["id"] == self.oma_vm["id"]:
                link = self.device_path(volume["id"])
                link.unlink(missing_ok=True)
                os.symlink(self.volume_file(volume["id"]), link)
            return {"volume": dict(volume)}

        return volume["id"], run

    def _cmd_detachVolume(self, params):
        self._require(params, "id")
        volume = self._volume(params["id"])
        if not volume.get("virtualmachineid"):
            raise ApiError(431, f"Volume {volume['name']} is not attached to any VM", 4350)
        owner = self.vms.get(volume["virtualmachineid"], {})
        if volume.get("deviceid") == 0 and owner.get("state") != "Stopped":
            raise ApiError(431, f"Root volume {volume['name']} can be detached only from a stopped VM", 4350)

        def run():
            if volume["virtualmachineid"] == self.oma_vm["id"]:
                self.device_path(volume["id"]).unlink(missing_ok=True)
            for key in ("virtualmachineid", "vmname", "deviceid"):
                volume.pop(key, None)
            volume["type"] = "DATADISK"
            return {"volume": dict(volume)}

        return volume["id"], run

    def _cmd_deleteVolume(self, params):
        volume = self._volume(params["id"])
        if volume.get("virtualmachineid"):
            raise ApiError(536, f"Please specify a volume that is not attached to any VM: {volume['name']}", 4350)
        del self.volumes[volume["id"]]
        self.volume_file(volume["id"]).unlink(missing_ok=True)
        return {"success": True}

