"""Names operators (or their tools) type: VMs, vCenters, protection groups,
clouds, network mappings. One rule for every way in (models, admin, pages,
commands, services): not empty, no longer than the column (SQLite does not
enforce max_length), and no control characters: a newline or NUL in a name
forges log lines, breaks command output and is never what someone meant."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError

# C0 controls (tab, newline, NUL, ESC...), DEL, C1 controls, and Unicode's
# line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def validate_no_control_characters(value: str) -> None:
    """The model validator (validators=[...]): refuses a control character."""
    found = _CONTROL.search(str(value))
    if found:
        raise ValidationError(
            "must not contain control characters (found %(char)s at position %(pos)s): "
            "no newlines, tabs or NUL in a name",
            code="control_character", params={"char": repr(found.group())[1:-1], "pos": found.start() + 1})


def checked(value, model, field: str = "name", *, error: type[Exception] = ValueError, what: str | None = None) -> str:
    """value stripped, if it may be model.field: else error(reason). For
    services and commands, which do not run a form's validation."""
    label = what or f"{model._meta.verbose_name} {field.replace('_', ' ')}"
    text = str(value if value is not None else "").strip()
    if not text:
        raise error(f"the {label} must not be empty")
    limit = model._meta.get_field(field).max_length
    if limit is not None and len(text) > limit:
        raise error(f"the {label} is {len(text)} characters long; at most {limit} are allowed")
    try:
        validate_no_control_characters(text)
    except ValidationError as exc:
        raise error(f"the {label} {exc.messages[0]}") from None
    return text
