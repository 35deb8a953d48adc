"""Who may do what: three roles, each a Django group holding permissions.

- viewer: reads every page and the JSON API (replication.read);
- operator: also replicates, cancels, retries and limits jobs, starts and
  ends test failovers, runs drills (replication.operate);
- administrator: also fails over live, rolls back, registers sources,
  vCenters and clouds, and manages network maps, agents, users, API tokens
  and the boot check settings in the Django admin (replication.administer,
  plus every model permission of the admin).

Superusers have everything. A user holds one role (granting replaces it);
the pages and the API check the permission (page_permission, and api.py's
api_view), so a role is a set of permissions, never a name compared in code.
Management commands run as whoever holds a shell on the OMA: an
administrator by definition, recorded as the OS user (os_actor)."""

from __future__ import annotations

import getpass
import os
from functools import wraps

READ = "replication.read"
OPERATE = "replication.operate"
ADMINISTER = "replication.administer"

VIEWER, OPERATOR, ADMINISTRATOR = "viewer", "operator", "administrator"
# Each role's own permissions (codenames), lowest first; a role holds its own and those below it.
ROLE_PERMISSIONS = {
    VIEWER: ["read"],
    OPERATOR: ["read", "operate"],
    ADMINISTRATOR: ["read", "operate", "administer"],
}
ROLES = list(ROLE_PERMISSIONS)
# The admin's audit trail stays as written: an administrator reads it, never edits it.
AUDIT_LOCKED = {("admin", "add_logentry"), ("admin", "change_logentry"), ("admin", "delete_logentry")}


def role_of(user) -> str | None:
    """The highest role the user holds (superusers: administrator)."""
    if not user.is_active:
        return None
    if user.is_superuser:
        return ADMINISTRATOR
    for role, perm in ((ADMINISTRATOR, ADMINISTER), (OPERATOR, OPERATE), (VIEWER, READ)):
        if user.has_perm(perm):
            return role
    return None


def required_role(perm: str) -> str:
    return {READ: VIEWER, OPERATE: OPERATOR, ADMINISTER: ADMINISTRATOR}[perm]


def actor_of(request) -> str:
    """Who acts, as the VM's history and the job timeline record it: the
    logged-in user, or the owner of the API token the request carried."""
    return request.user.get_username()[:100]


def os_actor() -> str:
    """The OS user running a management command, e.g. os:root."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = str(os.getuid())
    return f"os:{name}"


def command_actor(on_behalf_of: str = "") -> str:
    """A command's actor: the OS user, and whom they say they act for
    (--actor), e.g. "os:root for alice"."""
    return f"{os_actor()} for {on_behalf_of}"[:100] if on_behalf_of else os_actor()


def refusal(user, perm: str) -> str:
    role = role_of(user)
    needed = required_role(perm)
    if role is None:
        return (f"Your account {user.get_username()} has no role yet: ask an administrator for a role "
                f"(viewer, operator or administrator). This needs {needed}.")
    return f"This needs the {needed} role; {user.get_username()} is {role}. Ask an administrator."


def page_permission(perm: str, *, post: str | None = None):
    """A page or form action: anonymous users go to the login page; a user
    without the permission (`post` for POST, when given) gets the 403 page
    with the reason, and nothing runs."""

    def decorator(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            from django.contrib.auth.views import redirect_to_login
            from django.http import HttpResponse
            from django.shortcuts import render

            if not request.user.is_authenticated:
                if request.headers.get("HX-Request") == "true":
                    # htmx refreshing a fragment for a session that has ended:
                    # the whole page reloads (and so goes to the login page).
                    return HttpResponse(status=204, headers={"HX-Refresh": "true"})
                return redirect_to_login(request.get_full_path())
            needed = post if post is not None and request.method == "POST" else perm
            if not request.user.has_perm(needed):
                return render(request, "replication/forbidden.html",
                              {"reason": refusal(request.user, needed)}, status=403)
            return view(request, *args, **kwargs)

        return wrapped

    return decorator


def admin_site_permission(request) -> bool:
    """The Django admin: staff with the administrator role (its model
    permissions still decide what each page allows)."""
    user = request.user
    return user.is_active and user.is_staff and user.has_perm(ADMINISTER)


def ensure_roles(apps=None) -> dict:
    """Create or update the three groups and their permissions; idempotent
    (the data migration, post_migrate and `manage.py roles sync`). The
    administrator group also holds every model permission the admin checks,
    except changing its audit log. `apps`: a migration's app registry."""
    from replication.models import Role

    if apps is None:
        from django.apps import apps
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    ContentType = apps.get_model("contenttypes", "ContentType")
    content_type, _ = ContentType.objects.get_or_create(app_label="replication", model="role")
    own = {}
    for codename, name in Role._meta.permissions:
        own[codename], _ = Permission.objects.get_or_create(content_type=content_type, codename=codename,
                                                            defaults={"name": name})
    groups = {}
    for role, codenames in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=role)
        wanted = [own[codename] for codename in codenames]
        if role == ADMINISTRATOR:
            wanted += [perm for perm in Permission.objects.select_related("content_type")
                       if perm.content_type.app_label != "replication" or perm.content_type.model != "role"
                       if (perm.content_type.app_label, perm.codename) not in AUDIT_LOCKED]
        group.permissions.set(wanted)
        groups[role] = group
    return groups


def grant(user, role: str) -> None:
    """Give the user this role (and only this one). An administrator is
    staff, so the Django admin lets them in; a lower role is not."""
    from django.contrib.auth.models import Group

    if role not in ROLE_PERMISSIONS:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    ensure_roles()
    user.groups.remove(*Group.objects.filter(name__in=ROLES))
    user.groups.add(Group.objects.get(name=role))
    user.is_staff = role == ADMINISTRATOR or user.is_superuser
    user.save(update_fields=["is_staff"])


def revoke(user) -> None:
    from django.contrib.auth.models import Group

    user.groups.remove(*Group.objects.filter(name__in=ROLES))
    user.is_staff = user.is_superuser
    user.save(update_fields=["is_staff"])


def log_admin(request, obj, message: str, *, flag: int | None = None) -> None:
    """An action taken from the pages or the API, in Django admin's log
    (Recent actions, the object's history) under the real user."""
    from django.contrib.admin.models import CHANGE, LogEntry

    if not request.user.is_authenticated:
        return
    LogEntry.objects.log_actions(user_id=request.user.pk, queryset=[obj],
                                 action_flag=CHANGE if flag is None else flag, change_message=message[:2000],
                                 single_object=True)


def no_role_users():
    from django.contrib.auth.models import User

    return User.objects.filter(is_active=True, is_superuser=False).exclude(groups__name__in=ROLES)
