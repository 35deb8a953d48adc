from django.core.management.base import BaseCommand, CommandError

from replication.management.lookup import vm_named
from replication.platforms.base import BOOT_PROBES, DEFAULT_BOOT_PROBES, DEFAULT_BOOT_REGEX
from replication.services.boot_check import BootCheckError, set_boot_check


class Command(BaseCommand):
    help = ("How a failed-over VM's boot is seen: the probes to try (any one suffices), what the console or "
            "screen must show, and how long to wait.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--probe", action="append", default=None, metavar="|".join(BOOT_PROBES),
                            help="console: the serial console shows the regex; screen: the screen, read by OCR, "
                                 "shows it; network: a DHCP lease or an ARP answer on the VM's network; agent: "
                                 "the QEMU guest agent answers. Repeat for several. Default (none set): "
                                 f"{', '.join(DEFAULT_BOOT_PROBES)}; --probe default sets that back")
        parser.add_argument("--regex", default=None,
                            help="a Python regular expression for the console and screen; '' for the default, "
                                 "a login prompt, Windows' sign-in or the test guests' BOOT-MARKER "
                                 "(default: unchanged)")
        parser.add_argument("--timeout", type=int, default=None, help="seconds (default: unchanged, 120 at first)")

    def handle(self, name, probe, regex, timeout, **options):
        if probe is None and regex is None and timeout is None:
            raise CommandError("nothing to set: give --probe, --regex and/or --timeout")
        try:
            context = set_boot_check(vm_named(name), probes=probe, regex=regex, timeout_s=timeout)
        except BootCheckError as exc:
            raise CommandError("; ".join(f"--{key}: {why}" for key, why in exc.errors.items())) from None
        shown = context.boot_check_regex or f"the default {DEFAULT_BOOT_REGEX}"
        self.stdout.write(f"{name}: boot verified when any of {', '.join(context.probes())}"
                          f"{'' if context.boot_probes else ' (the default probes)'} sees it within "
                          f"{context.boot_check_timeout_s} s; console and screen must show /{shown}/")
