"""The pages where sources and the cloud are added and checked: vCenters
(certificate, login, which VMs to protect), image and NBD VMs, CloudStack."""

from django.contrib import messages
from django.contrib.admin.models import ADDITION
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_POST

from replication.models import CloudError, CloudStackConfig, VCenter, VMContext
from replication.platforms.cloudstack.client import CloudClient
from replication.platforms.cloudstack.drift import drift
from replication.roles import ADMINISTER, READ, actor_of, log_admin, page_permission
from replication.services import sources as source_service
from replication.services import vmware as vmware_service
from replication.services.inventory import InventoryError, register_image_vm
from replication.views.common import render_page
from vma_agent.vmware import VSphereError


@page_permission(READ)
def cloud(request):
    """The active cloud's config (the secret only by reference)."""
    config = CloudStackConfig.objects.filter(is_active=True).order_by("-created_at").first()
    return render_page(request, "replication/cloud.html", {"config": config})


@require_POST
@page_permission(ADMINISTER)
def cloud_check(request):
    """Ask the cloud about the config's credentials and ids, and compare its
    volumes with the records."""
    config = CloudStackConfig.objects.filter(is_active=True).order_by("-created_at").first()
    context = {"config": config, "checked": True}
    if config is not None:
        try:
            context.update(found=CloudClient(config, job_timeout_s=30).check(), drift=drift(config))
        except CloudError as exc:
            context["error"] = str(exc)
        outcome = (f"refused: {context['error']}" if "error" in context else "answered; {} volume(s) differ from "
                   "the records".format(sum(len(context["drift"][k]) for k in ("unknown", "gone", "elsewhere"))))
        log_admin(request, config, f"checked with the cloud from the pages: {outcome}")
    return render_page(request, "replication/cloud.html", context)


def _whole(text: str | None, what: str) -> int | None:
    if not (text or "").strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise InventoryError(f"{what} must be a whole number, not {text!r}") from None


@page_permission(READ, post=ADMINISTER)
def sources(request):
    """vCenters (add one: fetch its certificate, trust it, give the user and
    password) and image/NBD VMs (add one through add_vm's checks)."""
    context = {"form": {}, "image_form": {}}
    if request.method == "POST":
        step = request.POST.get("step")
        data = request.POST
        try:
            if step == "fetch":
                port = int(data.get("port") or 443)
                context["form"] = {"host": data.get("host", "").strip(), "port": port}
                context["form"]["thumbprint"] = source_service.certificate_thumbprint(context["form"]["host"], port)
                context["fetched"] = True
            elif step == "add":
                context["form"] = {k: data.get(k, "").strip() for k in ("host", "port", "thumbprint", "name", "user")}
                context["fetched"] = True
                vcenter = source_service.add_vcenter(context["form"]["name"], context["form"]["host"],
                                                     int(context["form"]["port"]), context["form"]["user"],
                                                     data.get("password", ""), context["form"]["thumbprint"])
                log_admin(request, vcenter, "vCenter added from the Sources page", flag=ADDITION)
                messages.info(request, f"vCenter {vcenter.name} added; choose which of its VMs to protect.")
                return redirect("vcenter-inventory", vcenter_id=vcenter.pk)
            elif step == "image":
                context["image_form"] = {k: data.get(k, "") for k in ("name", "disks", "cpus", "memory_mib")}
                vm = register_image_vm(data.get("name", ""), [line.strip() for line in data.get("disks", "")
                                                              .splitlines() if line.strip()],
                                       cpus=_whole(data.get("cpus"), "CPUs"),
                                       memory_mib=_whole(data.get("memory_mib"), "memory (MiB)"),
                                       firmware=data.get("firmware") or "bios")
                VMContext.registered(vm, actor_of(request), "from the Sources page")
                log_admin(request, vm, "VM added from the Sources page", flag=ADDITION)
                messages.info(request, f"VM {vm.name} added with {vm.disks.count()} disk(s).")
                return redirect("vm-list")
        except (vmware_service.VCenterConfigError, VSphereError, ValueError) as exc:
            context["vcenter_error"] = str(exc)
        except InventoryError as exc:
            context["image_error"] = str(exc)
    context["vcenters"] = VCenter.objects.order_by("name")
    return render_page(request, "replication/sources.html", context)


@page_permission(READ, post=ADMINISTER)
def vcenter_inventory(request, vcenter_id):
    """The vCenter's VMs; the chosen ones are recorded (discovered) for protection."""
    vcenter = get_object_or_404(VCenter, pk=vcenter_id)
    if request.method == "POST":
        names = request.POST.getlist("vm")
        try:
            recorded = vmware_service.discover(vcenter, names, actor=actor_of(request)) if names else []
        except (vmware_service.VCenterConfigError, VSphereError) as exc:
            messages.error(request, str(exc))
        else:
            log_admin(request, vcenter, f"VMs protected: {', '.join(vm.name for vm in recorded) or 'none'}")
            messages.info(request, f"{len(recorded)} VM(s) of {vcenter.name} protected: "
                                   f"{', '.join(vm.name for vm in recorded) or 'none chosen'}.")
            return redirect("vm-list")
    try:
        vms, error = source_service.inventory(vcenter), ""
    except (vmware_service.VCenterConfigError, VSphereError) as exc:
        vms, error = [], str(exc)
    return render_page(request, "replication/vcenter_inventory.html", {"vcenter": vcenter, "vms": vms, "error": error})


def _vcenter_page(request, vcenter, form, password_form, status=200):
    return render_page(request, "replication/vcenter_edit.html",
                       {"vcenter": vcenter, "form": form, "password_form": password_form,
                        "delete_refusal": source_service.vcenter_delete_refusal(vcenter)}, status=status)


@page_permission(ADMINISTER)
def vcenter_edit(request, vcenter_id):
    """Change how a vCenter is reached, or rotate its password (a login with
    the new settings first; nothing is stored when it is refused)."""
    from replication.forms import PasswordForm, VCenterForm

    vcenter = get_object_or_404(VCenter, pk=vcenter_id)
    initial = {k: getattr(vcenter, k) for k in ("host", "port", "username", "thumbprint", "agent")}
    form, password_form = VCenterForm(initial=initial, prefix="vc"), PasswordForm(prefix="pw")
    if request.method == "POST":
        if request.POST.get("action") == "password":
            password_form = PasswordForm(request.POST, prefix="pw")
            if password_form.apply(vcenter) is not None:
                log_admin(request, vcenter, "password rotated from the pages")
                messages.info(request, f"vCenter {vcenter.name}: new password stored; the login with it worked.")
                return redirect("vcenter-edit", vcenter_id=vcenter.pk)
        else:
            form = VCenterForm(request.POST, prefix="vc")
            if form.apply(vcenter) is not None:
                log_admin(request, vcenter, "connection changed from the pages")
                messages.info(request, f"vCenter {vcenter.name} saved; the login with its settings worked.")
                return redirect("vcenter-edit", vcenter_id=vcenter.pk)
        return _vcenter_page(request, vcenter, form, password_form, status=400)
    return _vcenter_page(request, vcenter, form, password_form)


@page_permission(ADMINISTER)
def vcenter_delete(request, vcenter_id):
    from django.urls import reverse

    vcenter = get_object_or_404(VCenter, pk=vcenter_id)
    refusal = source_service.vcenter_delete_refusal(vcenter)
    if request.method == "POST" and not refusal:
        name = vcenter.name
        log_admin(request, vcenter, "deleted from the pages", flag=3)
        source_service.delete_vcenter(vcenter)
        messages.info(request, f"vCenter {name} deleted.")
        return redirect("sources")
    back = reverse("vcenter-edit", args=[vcenter.pk])
    return render_page(request, "replication/confirm.html", {
        "title": f"Delete vCenter {vcenter.name}", "action_label": f"Delete vCenter {vcenter.name}",
        "consequences": [f"forget vCenter {vcenter.name} ({vcenter.host}:{vcenter.port}) and the password file the "
                         "pages stored for it", "nothing on the vCenter itself changes"],
        "refusal": refusal, "back_url": back,
        "crumbs": [(reverse("sources"), "Sources"), (back, vcenter.name)]},
        status=409 if refusal and request.method == "POST" else 200)


@page_permission(ADMINISTER)
def cloud_edit(request):
    """Add or change the CloudStack cloud (as add_cloud: checked with the cloud first)."""
    from replication.forms import CloudForm

    config = CloudStackConfig.objects.filter(is_active=True).order_by("-created_at").first()
    if request.method == "POST":
        form = CloudForm(request.POST)
        done = form.apply()
        if done is not None:
            config, found = done
            log_admin(request, config, "cloud recorded from the pages")
            messages.info(request, f"Cloud {config.name} recorded and active" +
                          (f": the cloud answers for {', '.join(found)}." if found else "."))
            return redirect("cloud")
        return render_page(request, "replication/cloud_edit.html", {"form": form, "config": config}, status=400)
    initial = {f: getattr(config, f) for f in CloudForm.base_fields} if config else {}
    return render_page(request, "replication/cloud_edit.html", {"form": CloudForm(initial=initial or None),
                                                                "config": config})
