import json

from django.core.management.base import BaseCommand, CommandError

from replication.models import NetworkMapping
from replication.services.network_maps import NetworkMapError, map_network, unmap_network


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
            try:
                unmap_network(source)
            except NetworkMapError as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(f"{source!r} no longer mapped")
            return
        if source is not None and not list_them:
            try:
                map_network(source, destination or "")
            except NetworkMapError as exc:
                raise CommandError(str(exc)) from exc
        mapping = NetworkMapping.as_dict()
        if as_json:
            self.stdout.write(json.dumps(mapping, indent=2))
            return
        for src, dst in mapping.items():
            self.stdout.write(f"{src} -> {dst}")
        if not mapping:
            self.stdout.write("no network mapped: a live failover of a VM with NICs is refused")
