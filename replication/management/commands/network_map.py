import json

from django.core.management.base import BaseCommand, CommandError

from replication.models import NetworkMapping
from replication.platforms import get_destination
from replication.platforms.base import DestinationError


class Command(BaseCommand):
    help = ("Map a source network (its name in vCenter) to the destination network a NIC on it joins on a live "
            "failover: network_map 'VM Network' prod-net. --list shows the mapping, --remove drops one.")

    def add_arguments(self, parser):
        parser.add_argument("source", nargs="?")
        parser.add_argument("destination", nargs="?")
        parser.add_argument("--list", action="store_true", dest="list_them")
        parser.add_argument("--remove", action="store_true")
        parser.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, source, destination, list_them, remove, as_json, **options):
        if remove:
            if not source:
                raise CommandError("--remove needs the source network")
            deleted, _ = NetworkMapping.objects.filter(source_network=source).delete()
            if not deleted:
                raise CommandError(f"source network {source!r} is not mapped")
            self.stdout.write(f"{source!r} no longer mapped")
            return
        if source is not None and not list_them:
            if not destination:
                raise CommandError("give the source network and the destination network it maps to")
            try:
                known = get_destination().has_network(destination)
            except DestinationError as exc:
                raise CommandError(f"cannot check destination network {destination!r}: {exc}") from exc
            if not known:
                raise CommandError(f"the destination has no network named {destination!r}")
            NetworkMapping.objects.update_or_create(source_network=source,
                                                    defaults={"destination_network": destination})
        mapping = NetworkMapping.as_dict()
        if as_json:
            self.stdout.write(json.dumps(mapping, indent=2))
            return
        for src, dst in mapping.items():
            self.stdout.write(f"{src} -> {dst}")
        if not mapping:
            self.stdout.write("no network mapped: a live failover of a VM with NICs is refused")
