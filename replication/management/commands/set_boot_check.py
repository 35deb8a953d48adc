import re

from django.core.management.base import BaseCommand, CommandError

from replication.management.lookup import vm_named
from replication.models import VMContext


class Command(BaseCommand):
    help = "What a failed-over VM's console must show for its boot to count, and how long to wait for it."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--regex", required=True, help="a Python regular expression; '' for any output")
        parser.add_argument("--timeout", type=int, default=None, help="seconds (default: unchanged, 120 at first)")

    def handle(self, name, regex, timeout, **options):
        try:
            re.compile(regex)
        except re.error as exc:
            raise CommandError(f"--regex {regex!r} is not a regular expression: {exc}") from exc
        if timeout is not None and not 1 <= timeout <= 3600:
            raise CommandError(f"--timeout must be 1..3600 seconds, not {timeout}")
        context = VMContext.of(vm_named(name))
        context.boot_check_regex = regex
        if timeout is not None:
            context.boot_check_timeout_s = timeout
        context.save(update_fields=["boot_check_regex", "boot_check_timeout_s", "updated_at"])
        self.stdout.write(f"{name}: boot verified when the console shows /{regex}/ within "
                          f"{context.boot_check_timeout_s} s")
