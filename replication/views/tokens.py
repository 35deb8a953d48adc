"""API tokens from the pages (as `manage.py api_token`): make one for a user
(its key shown once; only its SHA-256 is kept), list them, revoke one after
a confirmation. Administrators only (replication.roles)."""

from django.contrib import messages
from django.contrib.admin.models import ADDITION, DELETION
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse

from replication.models import ApiToken
from replication.roles import ADMINISTER, log_admin, page_permission
from replication.views.common import render_page


def _page(request, form, key=None, token=None, status=200):
    tokens = ApiToken.objects.select_related("user").order_by("user__username", "name", "created_at")
    return render_page(request, "replication/tokens.html",
                       {"form": form, "tokens": tokens, "key": key, "issued": token}, status=status)


@page_permission(ADMINISTER)
def token_list(request):
    from replication.forms import ApiTokenForm

    if request.method != "POST":
        return _page(request, ApiTokenForm())
    form = ApiTokenForm(request.POST)
    issued = form.apply()
    if issued is None:
        return _page(request, form, status=400)
    token, key = issued
    log_admin(request, token, f"API token {token.name} of {token.user.username} made from the pages", flag=ADDITION)
    # The key is in this response only: never stored, never redirected with.
    response = _page(request, ApiTokenForm(), key=key, token=token)
    response["Cache-Control"] = "no-store"
    return response


@page_permission(ADMINISTER)
def token_revoke(request, token_id):
    token = get_object_or_404(ApiToken.objects.select_related("user"), pk=token_id)
    if request.method == "POST":
        log_admin(request, token, f"API token {token.name} of {token.user.username} revoked from the pages",
                  flag=DELETION)
        token.delete()
        messages.info(request, f"Token {token.name!r} of {token.user.username} revoked.")
        return redirect("token-list")
    back = reverse("token-list")
    return render_page(request, "replication/confirm.html", {
        "title": f"Revoke token {token.name} of {token.user.username}",
        "action_label": f"Revoke token {token.name}",
        "consequences": [f"refuse every API call that carries it from now (scripts using {token.name!r} get 401)",
                         "it cannot be brought back: a new token has a new key"],
        "back_url": back, "crumbs": [(back, "API tokens")]})
