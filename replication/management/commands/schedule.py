from django.core.management.base import BaseCommand, CommandError

from replication.management.lookup import duration_s, group_named
from replication.services import scheduler


class Command(BaseCommand):
    help = ("A protection group's schedule: `schedule set GROUP --every 30m` or `--cron '0 */4 * * *' "
            "[--timezone Europe/Paris]`; `schedule clear GROUP`. Kept in the database (django-celery-beat): "
            "beat follows changes without a restart.")

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        put = actions.add_parser("set")
        put.add_argument("group")
        when = put.add_mutually_exclusive_group(required=True)
        when.add_argument("--every", type=duration_s, help="an interval, e.g. 30s, 15m, 4h")
        when.add_argument("--cron", help='"minute hour day-of-month month day-of-week"')
        put.add_argument("--timezone", default="UTC", help="the cron expression's time zone (default UTC)")
        actions.add_parser("clear").add_argument("group")

    def handle(self, action, group, **options):
        target = group_named(group)
        try:
            if action == "clear":
                scheduler.update_group(target, interval_s=None, cron="")
                self.stdout.write(f"group {target.name}: no schedule")
                return
            target = scheduler.set_schedule(target, interval_s=options["every"], cron=options["cron"] or "",
                                            tz=options["timezone"])
        except scheduler.ScheduleError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"group {target.name}: {target.schedule_label}")
