"""Who may call the OMA: API tokens for scripts, and the permissions the
three roles are made of (replication.roles grants and checks them)."""

from __future__ import annotations

import hashlib
import secrets

from django.db import models
from django.utils import timezone


class ApiToken(models.Model):
    """A token for scripts calling the JSON API (Authorization: Bearer ...),
    acting as its user. Only the token's SHA-256 is stored: it is shown once,
    when made (manage.py api_token)."""

    user = models.ForeignKey("auth.User", on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    key_sha256 = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API token"
        db_table = "api_tokens"

    def __str__(self):
        return f"{self.name} ({self.user})"

    @staticmethod
    def digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name: str) -> tuple[ApiToken, str]:
        key = secrets.token_urlsafe(32)
        return cls.objects.create(user=user, name=name[:100], key_sha256=cls.digest(key)), key

    @classmethod
    def user_for(cls, key: str):
        token = cls.objects.select_related("user").filter(key_sha256=cls.digest(key), user__is_active=True).first()
        if token is None:
            return None
        cls.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
        return token.user


class Role(models.Model):
    """No table: it only carries the roles' permissions (Meta.permissions)."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [
            ("read", "Read every page and the JSON API"),
            ("operate", "Replicate, cancel, retry and limit jobs; test failovers; drills"),
            ("administer", "Live failover, rollback, sources, vCenters, clouds, agents, users, tokens, settings"),
        ]

    def __str__(self):
        return "role"
