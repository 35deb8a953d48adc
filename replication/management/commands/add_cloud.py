from django.core.management.base import BaseCommand, CommandError

from replication.models import CloudError
from replication.platforms.cloudstack.config import register_cloud


class Command(BaseCommand):
    help = ("Record the CloudStack cloud (OSSEA in MigrateKit OSSEA) target volumes are created in, and make it the "
            "active one. The secret key is read from a file or an environment variable, never given on the command "
            "line. The credentials and every id are checked with read calls before anything is saved.")

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--api-url", required=True, help="e.g. https://cloud.example.com/client/api")
        parser.add_argument("--api-key", required=True)
        secret = parser.add_mutually_exclusive_group(required=True)
        secret.add_argument("--secret-file", default="", help="absolute path of a file holding the secret key")
        secret.add_argument("--secret-env", default="", help="environment variable holding the secret key")
        parser.add_argument("--zone", required=True, dest="zone_id")
        parser.add_argument("--disk-offering", required=True, dest="disk_offering_id",
                            help="a customized-size disk offering (volumes are sized in whole GiB)")
        parser.add_argument("--service-offering", default="", dest="service_offering_id")
        parser.add_argument("--network", default="", dest="network_id")
        parser.add_argument("--template", default="", dest="template_id")
        parser.add_argument("--oma-vm", required=True, dest="oma_vm_id", help="the id of the OMA's own VM")
        parser.add_argument("--device-dir", default="/dev/disk/by-id")
        parser.add_argument("--no-check", action="store_true", help="save without asking the cloud first")

    def handle(self, name, no_check, **options):
        fields = {key: options[key] for key in ("api_url", "api_key", "secret_file", "secret_env", "zone_id",
                                                "disk_offering_id", "service_offering_id", "network_id",
                                                "template_id", "oma_vm_id", "device_dir")}
        try:
            config, found = register_cloud(name, check=not no_check, **fields)
        except CloudError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"cloud {config.name} recorded and active" + (f": {', '.join(found)}" if found else ""))
