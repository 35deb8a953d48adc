"""CloudStack's API as its own source defines it, for every call this
project makes: the data the simulator (simulators/cloudstack.py) holds
itself and the project's calls to.

Read from apache/cloudstack main at 3d6cafe1936e (4.22.0.0-SNAPSHOT): the
command classes' @Parameter annotations, with the parameters every list
command inherits (BaseListCmd and its parents) and those of the root-admin
classes (…CmdByAdmin, same API name). Each command: its mode ("sync",
"async", or "async-create": a BaseAsyncCreateCmd whose first reply carries
the new entity's id with the job id) and its parameters, by wire name (lower
case, as CloudStack matches them), as (type, required). Types are listApis'
names: uuid, string, boolean, integer, long, map (``name[i].key=value``),
list<x> (comma-separated).

listCapabilities (ListCapabilitiesCmd) declares no parameter of its own.

What CloudStack does with a request, and the simulator with it:
- a required parameter missing: HTTP 431, `Unable to execute API command
  <command lower-cased> due to missing parameter <name>`; present but empty:
  431 `Invalid value provided for API arg: <name>`;
- a parameter it does not know: ignored (a WARN in its log only), so a
  misspelt name silently does nothing: the simulator records it
  (CloudStackSimulator.unknown_params) and the tests fail on it.
"""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    mode: str
    params: dict[str, tuple[str, bool]]

    def required(self) -> list[str]:
        return [name for name, (_, required) in self.params.items() if required]


# Parameters of every command that the framework handles itself (BaseCmd,
# BaseAsyncCmd, the signature check): never reported as unknown.
FRAMEWORK = frozenset({"command", "response", "apikey", "userapikey", "signature", "signatureversion", "expires",
                       "sessionkey", "starteventid", "customjobid", "httpmethod", "_"})

API: dict[str, Command] = {
    "listZones": Command("sync", {
        "id": ("uuid", False), "ids": ("list<uuid>", False), "available": ("boolean", False),
        "domainid": ("uuid", False), "name": ("string", False), "networktype": ("string", False),
        "showcapacities": ("boolean", False), "tags": ("map", False), "showicon": ("boolean", False),
        "storageaccessgroup": ("string", False), "keyword": ("string", False), "page": ("integer", False),
        "pagesize": ("integer", False),
    }),
    "listServiceOfferings": Command("sync", {
        "id": ("uuid", False), "name": ("string", False), "virtualmachineid": ("uuid", False),
        "issystem": ("boolean", False), "systemvmtype": ("string", False), "zoneid": ("uuid", False),
        "cpunumber": ("integer", False), "memory": ("integer", False), "cpuspeed": ("integer", False),
        "encryptroot": ("boolean", False), "storagetype": ("string", False), "state": ("string", False),
        "templateid": ("uuid", False), "vgpuprofileid": ("uuid", False), "gpuenabled": ("boolean", False),
        "projectid": ("uuid", False), "account": ("string", False), "listall": ("boolean", False),
        "domainid": ("uuid", False), "isrecursive": ("boolean", False), "keyword": ("string", False),
        "page": ("integer", False), "pagesize": ("integer", False),
    }),
    "listDiskOfferings": Command("sync", {
        "id": ("uuid", False), "name": ("string", False), "zoneid": ("uuid", False), "volumeid": ("uuid", False),
        "storageid": ("uuid", False), "encrypt": ("boolean", False), "storagetype": ("string", False),
        "state": ("string", False), "virtualmachineid": ("uuid", False), "projectid": ("uuid", False),
        "account": ("string", False), "listall": ("boolean", False), "domainid": ("uuid", False),
        "isrecursive": ("boolean", False), "keyword": ("string", False), "page": ("integer", False),
        "pagesize": ("integer", False),
    }),
    "listNetworks": Command("sync", {
        "id": ("uuid", False), "name": ("string", False), "zoneid": ("uuid", False), "type": ("string", False),
        "issystem": ("boolean", False), "acltype": ("string", False), "traffictype": ("string", False),
        "physicalnetworkid": ("uuid", False), "supportedservices": ("list<string>", False),
        "restartrequired": ("boolean", False), "specifyipranges": ("boolean", False), "vpcid": ("uuid", False),
        "canusefordeploy": ("boolean", False), "forvpc": ("boolean", False), "displaynetwork": ("boolean", False),
        "networkofferingid": ("uuid", False), "associatednetworkid": ("uuid", False), "showicon": ("boolean", False),
        "networkfilter": ("string", False), "retrieveonlyresourcecount": ("boolean", False), "tags": ("map", False),
        "projectid": ("uuid", False), "account": ("string", False), "listall": ("boolean", False),
        "domainid": ("uuid", False), "isrecursive": ("boolean", False), "keyword": ("string", False),
        "page": ("integer", False), "pagesize": ("integer", False), "vlan": ("string", False),
    }),
    "listTemplates": Command("sync", {
        "hypervisor": ("string", False), "id": ("uuid", False), "ids": ("list<uuid>", False),
        "name": ("string", False), "templatefilter": ("string", True), "zoneid": ("uuid", False),
        "showremoved": ("boolean", False), "showunique": ("boolean", False), "parenttemplateid": ("uuid", False),
        "details": ("list<string>", False), "templatetype": ("string", False), "isvnf": ("boolean", False),
        "forcks": ("boolean", False), "arch": ("string", False), "oscategoryid": ("uuid", False),
        "extensionid": ("uuid", False), "isready": ("boolean", False), "showicon": ("boolean", False),
        "tags": ("map", False), "projectid": ("uuid", False), "account": ("string", False),
        "listall": ("boolean", False), "domainid": ("uuid", False), "isrecursive": ("boolean", False),
        "keyword": ("string", False), "page": ("integer", False), "pagesize": ("integer", False),
        "imagestoreid": ("uuid", False), "storageid": ("uuid", False),
    }),
    "listCapacity": Command("sync", {
        "zoneid": ("uuid", False), "podid": ("uuid", False), "clusterid": ("uuid", False),
        "fetchlatest": ("boolean", False), "type": ("integer", False), "sortby": ("string", False),
        "tag": ("string", False), "keyword": ("string", False), "page": ("integer", False),
        "pagesize": ("integer", False),
    }),
    "listVirtualMachines": Command("sync", {
        "groupid": ("uuid", False), "id": ("uuid", False), "ids": ("list<uuid>", False), "name": ("string", False),
        "state": ("string", False), "zoneid": ("uuid", False), "forvirtualnetwork": ("boolean", False),
        "networkid": ("uuid", False), "hypervisor": ("string", False), "details": ("list<string>", False),
        "templateid": ("uuid", False), "isoid": ("uuid", False), "vpcid": ("uuid", False),
        "affinitygroupid": ("uuid", False), "keypair": ("string", False), "serviceofferingid": ("uuid", False),
        "backupofferingid": ("uuid", False), "displayvm": ("boolean", False), "userid": ("uuid", False),
        "securitygroupid": ("uuid", False), "haenable": ("boolean", False), "autoscalevmgroupid": ("uuid", False),
        "showicon": ("boolean", False), "accumulate": ("boolean", False), "userdata": ("boolean", False),
        "userdataid": ("uuid", False), "arch": ("string", False), "leased": ("boolean", False),
        "gpuenabled": ("boolean", False), "extensionid": ("uuid", False), "isvnf": ("boolean", False),
        "retrieveonlyresourcecount": ("boolean", False), "tags": ("map", False), "projectid": ("uuid", False),
        "account": ("string", False), "listall": ("boolean", False), "domainid": ("uuid", False),
        "isrecursive": ("boolean", False), "keyword": ("string", False), "page": ("integer", False),
        "pagesize": ("integer", False), "hostid": ("uuid", False), "podid": ("uuid", False),
        "storageid": ("uuid", False), "clusterid": ("uuid", False),
    }),
    "listVolumes": Command("sync", {
        "hostid": ("uuid", False), "id": ("uuid", False), "ids": ("list<uuid>", False), "name": ("string", False),
        "podid": ("uuid", False), "clusterid": ("uuid", False), "type": ("string", False),
        "virtualmachineid": ("uuid", False), "zoneid": ("uuid", False), "storageid": ("string", False),
        "serviceofferingid": ("uuid", False), "diskofferingid": ("uuid", False), "displayvolume": ("boolean", False),
        "listsystemvms": ("boolean", False), "state": ("string", False), "isencrypted": ("boolean", False),
        "retrieveonlyresourcecount": ("boolean", False), "tags": ("map", False), "projectid": ("uuid", False),
        "account": ("string", False), "listall": ("boolean", False), "domainid": ("uuid", False),
        "isrecursive": ("boolean", False), "keyword": ("string", False), "page": ("integer", False),
        "pagesize": ("integer", False),
    }),
    "listSnapshots": Command("sync", {
        "id": ("uuid", False), "ids": ("list<uuid>", False), "intervaltype": ("string", False),
        "name": ("string", False), "snapshottype": ("string", False), "volumeid": ("uuid", False),
        "zoneid": ("uuid", False), "showunique": ("boolean", False), "locationtype": ("string", False),
        "tags": ("map", False), "projectid": ("uuid", False), "account": ("string", False),
        "listall": ("boolean", False), "domainid": ("uuid", False), "isrecursive": ("boolean", False),
        "keyword": ("string", False), "page": ("integer", False), "pagesize": ("integer", False),
        "imagestoreid": ("uuid", False), "storageid": ("uuid", False),
    }),
    "createVolume": Command("async-create", {
        "account": ("string", False), "projectid": ("uuid", False), "domainid": ("uuid", False),
        "diskofferingid": ("uuid", False), "name": ("string", False), "size": ("long", False),
        "miniops": ("long", False), "maxiops": ("long", False), "snapshotid": ("uuid", False),
        "zoneid": ("uuid", False), "displayvolume": ("boolean", False), "virtualmachineid": ("uuid", False),
        "customid": ("string", False),
    }),
    "attachVolume": Command("async", {
        "deviceid": ("long", False), "id": ("uuid", True), "virtualmachineid": ("uuid", True),
    }),
    "detachVolume": Command("async", {
        "id": ("uuid", False), "deviceid": ("long", False), "virtualmachineid": ("uuid", False),
    }),
    "deleteVolume": Command("sync", {
        "id": ("uuid", True),
    }),
    "createSnapshot": Command("async-create", {
        "account": ("string", False), "domainid": ("uuid", False), "volumeid": ("uuid", True),
        "policyid": ("uuid", False), "quiescevm": ("boolean", False), "locationtype": ("string", False),
        "name": ("string", False), "asyncbackup": ("boolean", False), "tags": ("map", False),
        "zoneids": ("list<uuid>", False), "storageids": ("list<uuid>", False),
        "usestoragereplication": ("boolean", False),
    }),
    "revertSnapshot": Command("async", {
        "id": ("uuid", True),
    }),
    "deleteSnapshot": Command("async", {
        "id": ("uuid", True), "zoneid": ("uuid", False),
    }),
    "deployVirtualMachine": Command("async-create", {
        "serviceofferingid": ("uuid", True), "templateid": ("uuid", False), "volumeid": ("uuid", False),
        "snapshotid": ("uuid", False), "zoneid": ("uuid", True), "name": ("string", False),
        "displayname": ("string", False), "password": ("string", False), "account": ("string", False),
        "domainid": ("uuid", False), "networkids": ("list<uuid>", False), "boottype": ("string", False),
        "bootmode": ("string", False), "bootintosetup": ("boolean", False), "diskofferingid": ("uuid", False),
        "size": ("long", False), "rootdisksize": ("long", False), "datadisksdetails": ("map", False),
        "group": ("string", False), "hypervisor": ("string", False), "userdata": ("string", False),
        "userdataid": ("uuid", False), "userdatadetails": ("map", False), "keypair": ("string", False),
        "keypairs": ("list<string>", False), "hostid": ("uuid", False), "securitygroupids": ("list<uuid>", False),
        "securitygroupnames": ("list<string>", False), "iptonetworklist": ("map", False),
        "ipaddress": ("string", False), "ip6address": ("string", False), "macaddress": ("string", False),
        "keyboard": ("string", False), "projectid": ("uuid", False), "startvm": ("boolean", False),
        "affinitygroupids": ("list<uuid>", False), "affinitygroupnames": ("list<string>", False),
        "displayvm": ("boolean", False), "details": ("map", False), "deploymentplanner": ("string", False),
        "dhcpoptionsnetworklist": ("map", False), "datadiskofferinglist": ("map", False),
        "extraconfig": ("string", False), "copyimagetags": ("boolean", False), "properties": ("map", False),
        "nicnetworklist": ("map", False), "dynamicscalingenabled": ("boolean", False),
        "overridediskofferingid": ("uuid", False), "iothreadsenabled": ("boolean", False),
        "iodriverpolicy": ("string", False), "nicmultiqueuenumber": ("integer", False),
        "nicpackedvirtqueuesenabled": ("boolean", False), "leaseduration": ("integer", False),
        "leaseexpiryaction": ("string", False), "externaldetails": ("map", False), "customid": ("string", False),
        "podid": ("uuid", False), "clusterid": ("uuid", False),
    }),
    "startVirtualMachine": Command("async", {
        "id": ("uuid", True), "podid": ("uuid", False), "clusterid": ("uuid", False), "hostid": ("uuid", False),
        "considerlasthost": ("boolean", False), "deploymentplanner": ("string", False),
        "bootintosetup": ("boolean", False),
    }),
    "stopVirtualMachine": Command("async", {
        "id": ("uuid", True), "forced": ("boolean", False),
    }),
    "destroyVirtualMachine": Command("async", {
        "id": ("uuid", True), "expunge": ("boolean", False), "volumeids": ("list<uuid>", False),
    }),
    "queryAsyncJobResult": Command("sync", {
        "jobid": ("uuid", True),
    }),
    "listCapabilities": Command("sync", {}),
}


def wire_name(key: str) -> str:
    """The name CloudStack looks a request parameter up by: lower-cased,
    a map's `name[i].field` by its `name` (the field keeps its case)."""
    return key.split("[", 1)[0].lower()
