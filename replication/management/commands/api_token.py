from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from replication.models import ApiToken


class Command(BaseCommand):
    help = ("Make a token for scripts calling the JSON API as USER (Authorization: Bearer TOKEN). The token is "
            "printed once; only its SHA-256 is kept. --revoke NAME removes a user's tokens of that name.")

    def add_arguments(self, parser):
        parser.add_argument("name", help="what the token is for, e.g. monitoring")
        parser.add_argument("--user", required=True)
        parser.add_argument("--revoke", action="store_true")

    def handle(self, name, user, revoke, **options):
        try:
            owner = User.objects.get(username=user)
        except User.DoesNotExist:
            raise CommandError(f"no user named {user!r} (manage.py createsuperuser)") from None
        if revoke:
            deleted, _ = ApiToken.objects.filter(user=owner, name=name).delete()
            if not deleted:
                raise CommandError(f"{user} has no token named {name!r}")
            self.stdout.write(f"{deleted} token(s) {name!r} of {user} revoked")
            return
        _, key = ApiToken.issue(owner, name)
        self.stdout.write(key)
