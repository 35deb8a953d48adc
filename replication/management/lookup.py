from django.core.management.base import CommandError

from replication.models import VirtualMachine


def vm_named(name: str, hint: str = "") -> VirtualMachine:
    """The VM called `name`, or a CommandError that says there is none."""
    try:
        return VirtualMachine.objects.get(name=name)
    except VirtualMachine.DoesNotExist:
        raise CommandError(f"no VM named {name!r}{hint}") from None
