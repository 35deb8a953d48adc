import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from replication.management.lookup import duration_s, group_named, vm_named
from replication.models import ProtectionGroup
from replication.services import rpo, scheduler


class Command(BaseCommand):
    help = ("Protection groups: create, add/remove VMs (a VM is in at most one group), pause/resume, delete, "
            "list. Their schedules: `schedule set`.")

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        create = actions.add_parser("create", help="a new group (no schedule yet: `schedule set`)")
        create.add_argument("name")
        self._policy_options(create)
        update = actions.add_parser("update", help="change a group's limits and targets")
        update.add_argument("name")
        self._policy_options(update)
        for action in ("add", "remove"):
            members = actions.add_parser(action, help=f"{action} VMs")
            members.add_argument("name")
            members.add_argument("vms", nargs="+", metavar="VM")
        for action in ("pause", "resume", "delete"):
            actions.add_parser(action).add_argument("name")
        show = actions.add_parser("list", help="groups, their members and recovery points")
        show.add_argument("--json", action="store_true", dest="as_json")

    @staticmethod
    def _policy_options(parser):
        parser.add_argument("--limit", type=int, dest="max_concurrent", help="cycles of the group at once")
        parser.add_argument("--rpo", type=duration_s, dest="rpo_target_s", help="recovery point target, e.g. 15m")
        parser.add_argument("--retries", type=int, dest="max_retries", help="retries of a failed scheduled cycle")
        parser.add_argument("--backoff", type=duration_s, dest="retry_backoff_s",
                            help="first retry after this (doubling), e.g. 60s")
        parser.add_argument("--drill-every", type=duration_s, dest="drill_interval_s",
                            help="rehearse each VM's recovery (a test failover) this often, e.g. 1d")
        parser.add_argument("--points-keep", type=int, dest="points_keep", metavar="N",
                            help="recovery points kept per VM: the newest N (default RECOVERY_POINTS_KEEP)")
        parser.add_argument("--points-hourly", type=int, dest="points_hourly_h", metavar="H",
                            help="also keep the newest point of each hour for H hours (0: none)")
        parser.add_argument("--points-daily", type=int, dest="points_daily_d", metavar="D",
                            help="also keep the newest point of each day for D days (0: none)")
        parser.add_argument("--description")

    def handle(self, action, **options):
        try:
            getattr(self, f"do_{action}")(**options)
        except scheduler.ScheduleError as exc:
            raise CommandError(str(exc)) from exc

    def _fields(self, options) -> dict:
        return {key: options[key] for key in ("max_concurrent", "rpo_target_s", "max_retries", "retry_backoff_s",
                                              "drill_interval_s", "points_keep", "points_hourly_h",
                                              "points_daily_d", "description") if options.get(key) is not None}

    def do_create(self, name, **options):
        group = scheduler.create_group(name, **self._fields(options))
        self.stdout.write(f"group {group.name}: limit {group.max_concurrent}, RPO target {group.rpo_target_s} s, "
                          f"{group.max_retries} retries, {_retention(group)}; no schedule yet "
                          f"(schedule set {group.name} --every 15m)")

    def do_update(self, name, **options):
        group = scheduler.update_group(group_named(name), **self._fields(options))
        drills = f"drills every {group.drill_interval_s} s" if group.drill_interval_s else "no drills"
        self.stdout.write(f"group {group.name}: limit {group.max_concurrent}, RPO target {group.rpo_target_s} s, "
                          f"{group.max_retries} retries, backoff {group.retry_backoff_s} s, {drills}; "
                          f"{_retention(group)}")

    def do_add(self, name, vms, **options):
        group = group_named(name)
        scheduler.add_vms(group, [vm_named(vm) for vm in vms])
        self.stdout.write(f"group {group.name}: {', '.join(vms)} added")

    def do_remove(self, name, vms, **options):
        group = group_named(name)
        scheduler.remove_vms(group, [vm_named(vm) for vm in vms])
        self.stdout.write(f"group {group.name}: {', '.join(vms)} removed")

    def do_pause(self, name, **options):
        scheduler.set_paused(group_named(name), True)
        self.stdout.write(f"group {name} paused: it starts nothing until resumed")

    def do_resume(self, name, **options):
        scheduler.set_paused(group_named(name), False)
        self.stdout.write(f"group {name} resumed")

    def do_delete(self, name, **options):
        scheduler.delete_group(group_named(name))
        self.stdout.write(f"group {name} deleted; its VMs are in no group")

    def do_list(self, as_json: bool = False, **options):
        groups = []
        for group in ProtectionGroup.objects.all():
            points = rpo.recovery_points(group.vms.all())
            groups.append({"name": group.name, "schedule": group.schedule_label, "paused": group.paused,
                           "limit": group.max_concurrent, "rpo_target_s": group.rpo_target_s,
                           "max_retries": group.max_retries, "retry_backoff_s": group.retry_backoff_s,
                           "points_keep": group.points_keep or settings.RECOVERY_POINTS_KEEP,
                           "points_hourly_h": group.points_hourly_h, "points_daily_d": group.points_daily_d,
                           "vms": [point.as_dict() for point in points]})
        if as_json:
            self.stdout.write(json.dumps(groups, indent=2))
            return
        for group in groups:
            state = " (paused)" if group["paused"] else ""
            self.stdout.write(f"{group['name']}{state}: {group['schedule']}, limit {group['limit']}, "
                              f"RPO target {group['rpo_target_s']} s, keeps {group['points_keep']} point(s)"
                          + (f" + hourly for {group['points_hourly_h']} h" if group["points_hourly_h"] else "")
                          + (f" + daily for {group['points_daily_d']} d" if group["points_daily_d"] else ""))
            for vm in group["vms"]:
                age = "never" if vm["age_s"] is None else f"{vm['age_s']:.0f} s"
                mark = "  OVER TARGET" if vm["over_target"] else ""
                flag = f"  flagged: {vm['flag']}" if vm["flag"] else ""
                self.stdout.write(f"  {vm['vm']}: recovery point age {age}{mark}{flag}")



def _retention(group: ProtectionGroup) -> str:
    """The group's recovery point retention, as the commands print it."""
    text = f"keeps {group.points_keep or settings.RECOVERY_POINTS_KEEP} recovery point(s) per VM"
    if group.points_hourly_h:
        text += f" + the newest of each hour for {group.points_hourly_h} h"
    if group.points_daily_d:
        text += f" + the newest of each day for {group.points_daily_d} d"
    return text
