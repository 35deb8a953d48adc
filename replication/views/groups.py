"""Protection groups from the browser: create or edit one (its limits and
targets, its schedule, its drills' interval, its VMs), delete it after a
confirmation, run a drill now. The same services as `manage.py group`,
`schedule` and `drill` (replication.forms.GroupForm); changing groups needs
the administrator role, running a drill the operator role (roles.py)."""

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from replication.models import ProtectionGroup
from replication.roles import ADMINISTER, OPERATE, actor_of, log_admin, page_permission
from replication.services import drills, scheduler
from replication.views.common import render_page


def _form_page(request, form, group, status=200):
    title = f"Edit group {group.name}" if group else "New protection group"
    return render_page(request, "replication/group_form.html", {"form": form, "group": group, "title": title},
                       status=status)


@page_permission(ADMINISTER)
def group_new(request):
    from replication.forms import GroupForm

    if request.method != "POST":
        return _form_page(request, GroupForm(), None)
    form = GroupForm(request.POST)
    group = form.apply()
    if group is None:
        return _form_page(request, form, None, status=400)
    log_admin(request, group, "created from the pages", flag=1)
    messages.info(request, f"Protection group {group.name} created: {group.schedule_label}, "
                           f"{group.vms.count()} VM(s).")
    return redirect(f"{reverse('protection')}#group-{group.pk}")


@page_permission(ADMINISTER)
def group_edit(request, group_id):
    from replication.forms import GroupForm

    group = get_object_or_404(ProtectionGroup, pk=group_id)
    if request.method != "POST":
        return _form_page(request, GroupForm(group=group), group)
    form = GroupForm(request.POST, group=group)
    if form.apply() is None:
        return _form_page(request, form, group, status=400)
    log_admin(request, group, "changed from the pages")
    messages.info(request, f"Protection group {group.name} saved: {group.schedule_label}.")
    return redirect(f"{reverse('protection')}#group-{group.pk}")


@page_permission(ADMINISTER)
def group_delete(request, group_id):
    group = get_object_or_404(ProtectionGroup, pk=group_id)
    vms = list(group.vms.values_list("name", flat=True))
    if request.method == "POST":
        name = group.name
        log_admin(request, group, "deleted from the pages", flag=3)
        scheduler.delete_group(group)
        messages.info(request, f"Protection group {name} deleted; its VMs are in no group.")
        return redirect("protection")
    back = reverse("group-edit", args=[group.pk])
    consequences = [f"stop its schedule ({group.schedule_label}) and its drills",
                    (f"leave its VMs ({', '.join(vms)}) in no group: nothing replicates them on a schedule"
                     if vms else "it has no VMs"),
                    "keep every VM, its replicas, recovery points and history"]
    return render_page(request, "replication/confirm.html", {
        "title": f"Delete group {group.name}", "action_label": f"Delete group {group.name}",
        "consequences": consequences, "back_url": back,
        "crumbs": [(reverse("protection"), "Protection"), (back, group.name)]})


@require_POST
@page_permission(OPERATE)
def group_drill(request, group_id):
    group = get_object_or_404(ProtectionGroup, pk=group_id)
    try:
        runs = drills.start_now(group, actor_of(request))
    except drills.DrillError as exc:
        messages.error(request, str(exc))
        return redirect(f"{reverse('protection')}#group-{group.pk}")
    log_admin(request, group, f"drill started from the pages: {len(runs)} VM(s)")
    messages.info(request, f"Drill of group {group.name}: {', '.join(run.vm.name for run in runs)}.")
    return redirect(f"{reverse('protection')}#group-{group.pk}")


