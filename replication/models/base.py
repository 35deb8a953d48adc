"""The one shape of a state transition, shared by every model with a status.

A move is one conditional UPDATE from the states its table in choices.py
allows, so two processes racing on one row cannot both win, and a state
with no way out stays final. A caller that accepts fewer states than the
table (`only_from`) narrows it; none widens it."""

from __future__ import annotations

from django.db import models

from replication.choices import sources_of


class StateMachine(models.Model):
    """Abstract: a model whose `state_field` moves only along `transitions`."""

    state_field = "status"
    transitions: dict = {}

    class Meta:
        abstract = True

    @classmethod
    def move_rows(cls, rows: models.QuerySet, to, *, only_from=None, **fields) -> int:
        """transition() for every row of `rows` at once: those whose stored
        state may go to `to` move, with `fields`; returns how many did."""
        allowed = sources_of(cls.transitions, to, only_from)
        return rows.filter(**{f"{cls.state_field}__in": allowed}).update(**{cls.state_field: to}, **fields)

    def transition(self, to, *, only_from=None, **fields) -> bool:
        """Move to `to` if allowed from the stored state; returns whether
        this call made the move. Refreshes the instance either way."""
        return self._move(type(self)._default_manager.filter(pk=self.pk), to, only_from, fields)

    def _move(self, rows: models.QuerySet, to, only_from, fields: dict) -> bool:
        moved = self.move_rows(rows, to, only_from=only_from, **fields)
        self.refresh_from_db()
        return bool(moved)
