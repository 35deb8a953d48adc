"""A VM's settings page (/vms/<pk>/settings/): its boot check, hardware
choices, guest conversion, the network mapping of its NICs' networks,
starting a cycle with a bandwidth limit, comparing its replicas with its
sources (a task), and the destructive actions, each behind a confirmation
page naming what will happen: remove a network mapping, remove its
replicas, decommission it.

Every form goes through the service its management command calls
(replication.forms); who may press what follows replication.roles:
reading needs viewer, starting a cycle or a comparison operator, changing
settings, mapping and unmapping networks, removing replicas and
decommissioning administrator."""

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse

from replication.choices import VMState
from replication.forms import BootCheckForm, GuestConversionForm, HardwareForm, NetworkMapForm, ReplicateForm
from replication.models import NetworkMapping, TargetVolume, VirtualMachine, VMContext
from replication.roles import ADMINISTER, OPERATE, READ, actor_of, log_admin, page_permission, refusal
from replication.services import checksums, hardware, network_maps
from replication.services.protection import ProtectionError, decommission_refusal
from replication.services.protection import decommission as decommission_vm
from replication.services.protection import remove_replicas as remove_vm_replicas
from replication.views.common import render_page

# Each form's action: the permission it needs and its form.
ACTIONS = {
    "boot": (ADMINISTER, "boot_form"),
    "hardware": (ADMINISTER, "hardware_form"),
    "conversion": (ADMINISTER, "conversion_form"),
    "network": (ADMINISTER, "network_form"),
    "replicate": (OPERATE, "replicate_form"),
    "checksums": (OPERATE, None),
}
CHECKSUM_RUNS_SHOWN = 5


def _forms(context, data=None, action=None) -> dict:
    def bound(name):
        return data if action == name else None

    return {
        "boot_form": BootCheckForm.for_context(context, bound("boot")),
        "hardware_form": HardwareForm.for_context(context, bound("hardware")),
        "conversion_form": GuestConversionForm(bound("conversion"), initial={"convert_guest": context.convert_guest},
                                               prefix="conv"),
        "network_form": NetworkMapForm(bound("network"), prefix="net"),
        "replicate_form": ReplicateForm(bound("replicate"), prefix="rep"),
    }


def _replicas(vm):
    return list(TargetVolume.objects.filter(source_disk__vm=vm, retired_at__isnull=True)
                .select_related("source_disk").order_by("source_disk__disk_key"))


def _page(request, vm, context, forms, status=200):
    mapping = NetworkMapping.as_dict()
    networks = sorted({nic.get("network", "") for nic in vm.nics or [] if nic.get("network")})
    return render_page(request, "replication/vm_settings.html", {
        "vm": vm, "context": context, **forms,
        "hardware": hardware.for_vm(vm, context=context),
        "networks": [(network, mapping.get(network, "")) for network in networks],
        "mapping": sorted(mapping.items()),
        "replicas": _replicas(vm),
        "checksum_runs": vm.checksum_runs.all()[:CHECKSUM_RUNS_SHOWN],
        "decommission_refusal": decommission_refusal(vm),
        "decommissioned": context.state == VMState.DECOMMISSIONED,
    }, status)


@page_permission(READ)
def vm_settings(request, vm_id):
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    context = VMContext.of(vm)
    if request.method != "POST":
        return _page(request, vm, context, _forms(context))
    action = request.POST.get("action", "")
    if action not in ACTIONS:
        messages.error(request, f"Unknown action {action!r}.")
        return redirect("vm-settings", vm_id=vm.pk)
    perm, form_name = ACTIONS[action]
    if not request.user.has_perm(perm):
        return render(request, "replication/forbidden.html", {"reason": refusal(request.user, perm)}, status=403)
    if action == "checksums":
        run = checksums.start(vm, actor_of(request))
        log_admin(request, vm, f"checksum comparison {run.pk} started")
        messages.info(request, f"Comparing the checksums of {vm.name}'s disks; the outcome shows below.")
        return redirect("vm-settings", vm_id=vm.pk)
    forms = _forms(context, request.POST, action)
    form = forms[form_name]
    if action == "replicate":
        job = form.apply(vm, actor_of(request))
        if job is not None:
            log_admin(request, vm, f"{job.sync_type} replication {job.id} started from its settings")
            messages.info(request, f"Started {job.sync_type} replication {job.id} of {vm.name}.")
            return redirect("job-detail", job_id=job.id)
    elif form.apply(vm):
        log_admin(request, vm, f"{action} settings changed: {_said(form)}")
        messages.info(request, f"{vm.name}: {form_name.removesuffix('_form').replace('_', ' ')} settings saved.")
        return redirect("vm-settings", vm_id=vm.pk)
    return _page(request, vm, VMContext.of(vm), forms, status=400)


def _said(form) -> str:
    return ", ".join(f"{key}={value}" for key, value in form.cleaned_data.items())[:500]


def _confirm(request, vm, *, title, action_label, consequences, perm, act, done_message, refusal_text="",
             warning="Deleted replicas cannot be brought back."):
    """A destructive action: GET shows what will happen (or why it cannot),
    POST does it."""
    if not request.user.has_perm(perm):
        return render(request, "replication/forbidden.html", {"reason": refusal(request.user, perm)}, status=403)
    back = reverse("vm-settings", args=[vm.pk])
    page = {"title": title, "action_label": action_label, "consequences": consequences, "refusal": refusal_text,
            "back_url": back, "crumbs": [(reverse("vm-list"), "VMs"), (back, vm.name)],
            "warning": warning}
    if request.method == "POST" and not refusal_text:
        try:
            done = act()
        except (ProtectionError, network_maps.NetworkMapError) as exc:
            page["refusal"] = str(exc)
            return render_page(request, "replication/confirm.html", page, 409)
        log_admin(request, vm, done_message.format(count=len(done)))
        messages.info(request, done_message.format(count=len(done)) + (": " + "; ".join(done) if done else ""))
        return redirect("vm-settings", vm_id=vm.pk)
    return render_page(request, "replication/confirm.html", page, 409 if refusal_text and
                              request.method == "POST" else 200)


def _replica_lines(vm) -> list[str]:
    return [f"delete the replica of disk {volume.source_disk.disk_key}: {volume.cloud_volume_id or volume.path} "
            f"({volume.get_provider_display().lower()})" for volume in _replicas(vm)]


@page_permission(READ)
def vm_remove_replicas(request, vm_id):
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    replicas = _replica_lines(vm)
    return _confirm(
        request, vm, title=f"Remove the replicas of {vm.name}", action_label=f"Remove the replicas of {vm.name}",
        consequences=[*replicas, "forget its change tracking: the next cycle copies every disk in full",
                      "keep its jobs, failovers and history"],
        refusal_text="" if replicas else f"VM {vm.name} has no replica volumes",
        perm=ADMINISTER, act=lambda: remove_vm_replicas(vm, actor=actor_of(request)),
        done_message=f"{vm.name}: {{count}} replica volume(s) removed; the next cycle is a full copy")


@page_permission(READ)
def vm_decommission(request, vm_id):
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    group = [f"take it out of protection group {vm.group.name}"] if vm.group else []
    return _confirm(
        request, vm, title=f"Decommission {vm.name}", action_label=f"Decommission {vm.name}",
        consequences=[*_replica_lines(vm), *group, "hide it from the VM list and the protection pages for good",
                      "never replicate or fail it over again",
                      "keep its jobs, failovers, recovery point records and history"],
        refusal_text=decommission_refusal(vm),
        perm=ADMINISTER, act=lambda: decommission_vm(vm, actor=actor_of(request)),
        done_message=f"{vm.name} decommissioned: {{count}} replica volume(s) removed, its history kept")


@page_permission(READ)
def vm_unmap_network(request, vm_id):
    """Remove one network mapping (?source=its source network), from a VM's
    settings page; the mapping is one for every VM, so the confirmation names
    the VMs a live failover of is then refused."""
    vm = get_object_or_404(VirtualMachine, pk=vm_id)
    source = request.GET.get("source", "")
    mapping = NetworkMapping.objects.filter(source_network=source).first()
    users = network_maps.vms_on(source)
    return _confirm(
        request, vm, title=f"Remove the mapping of network {source}",
        action_label=f"Remove the mapping of {source}",
        consequences=[f"remove the mapping {mapping} for every VM",
                      (f"refuse a live failover of the {len(users)} VM(s) with a NIC on {source} "
                       f"({', '.join(users)}) until it is mapped again") if users
                      else f"leave every VM as it is: no VM recorded has a NIC on {source}",
                      "leave test failovers as they are: they join the isolated test network"],
        refusal_text="" if mapping else network_maps.unmapped_reason(source),
        perm=ADMINISTER, act=lambda: network_maps.unmap_network(source) or [],
        warning="", done_message=f"{source!r} no longer mapped")
