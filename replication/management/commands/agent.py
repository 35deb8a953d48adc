"""manage.py agent SUBCOMMAND: the agents (MigrateKit OSSEA's VMAs) as records.

One function per subcommand: SUBCOMMANDS maps a name to (help, add its
arguments, run it): agents reached by hand (add, list, pause, resume,
drain, remove) and enrolment (pairing-code, approve, reject, revoke). Each
runner gets the parsed options and the command (for stdout); a refusal is
a CommandError with the reason."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from replication.roles import command_actor, os_actor
from replication.services import agents, enrolment


def _add_arguments(parser):
    parser.add_argument("name", help="the agent's name (its queue: vma.<name>)")
    parser.add_argument("--url", required=True, help="where the OMA reaches its progress API, e.g. "
                                                     "http://127.0.0.1:9101 (the OMA's end of a tunnel or VPN)")
    parser.add_argument("--token-file", required=True,
                        help="absolute path of a file on the OMA holding the agent host's VMA_TOKEN")
    parser.add_argument("--max-vms", type=int, default=None, help="VMs in flight on it (default AGENT_MAX_VMS)")
    parser.add_argument("--max-disks", type=int, default=None,
                        help="disks in flight on it (default AGENT_MAX_DISKS)")
    parser.add_argument("--max-per-host", type=int, default=None,
                        help="VMs in flight per ESXi host (default AGENT_MAX_PER_HOST)")


def add(command, options):
    agent = agents.add(options["name"], options["url"], options["token_file"], max_vms=options["max_vms"],
                       max_disks=options["max_disks"], max_per_host=options["max_per_host"], actor=os_actor())
    command.stdout.write(f"agent {agent.name} added ({agent.get_state_display()}): its API at {agent.api_url}, "
                         f"its worker consumes queue {agent.queue}")


def _list_arguments(parser):
    parser.add_argument("--json", dest="as_json", action="store_true", help="print the agents as JSON")


def _ago(when) -> str:
    if when is None:
        return "never"
    seconds = max(0, int((timezone.now() - when).total_seconds()))
    return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"


def list_(command, options):
    rows = agents.listing()
    if options["as_json"]:
        command.stdout.write(json.dumps([row.as_dict() for row in rows], indent=2))
        return
    if not rows:
        command.stdout.write("no agents (the embedded agent 'local' is recorded on first use)")
        return
    header = ("NAME", "STATE", "CHANNEL", "URL", "LAST SEEN", "VERSION", "COPIES", "VMS")
    table = [header] + [(r.agent.name, r.agent.state, r.agent.channel, agents.api_url(r.agent),
                         _ago(r.agent.last_seen_at), r.agent.version or "-", str(r.copies_running), str(r.vms))
                        for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        command.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    for r in rows:
        if r.agent.last_error:
            command.stdout.write(f"{r.agent.name}: last error: {r.agent.last_error}")


def _name_argument(parser):
    parser.add_argument("name", help="the agent's name")


def _state_change(action):
    def run(command, options):
        agent = agents.change_state(options["name"], action, actor=os_actor())
        command.stdout.write(f"agent {agent.name} is now {agent.get_state_display()}")
    return run


def remove(command, options):
    agents.remove(options["name"], actor=os_actor())
    command.stdout.write(f"agent {options['name']} removed")


# Enrolment ------------------------------------------------------------------

def _code_arguments(parser):
    parser.add_argument("--expires-min", type=int, default=None, dest="minutes",
                        help="minutes it stays valid (default PAIRING_CODE_MINUTES, 15)")
    parser.add_argument("--json", action="store_true", dest="as_json")


def pairing_code(command, options):
    code = enrolment.new_pairing_code(command_actor(), options["minutes"])
    command.stdout.write(json.dumps({"code": code}) if options["as_json"] else code)


def _enrolment_arguments(parser):
    parser.add_argument("name", help="the agent's name")
    parser.add_argument("--actor", default="", help="whom you act for (recorded in the audit trail)")


def approve(command, options):
    agent = enrolment.approve(options["name"], command_actor(options["actor"]))
    command.stdout.write(f"agent {agent.name} approved: broker user {agent.broker_user}, queue {agent.queue}, "
                         f"tunnel port {agent.tunnel_port} (its API read at {agent.api_url})")


def reject(command, options):
    enrolment.reject(options["name"], command_actor(options["actor"]))
    command.stdout.write(f"agent {options['name']} rejected")


def revoke(command, options):
    enrolment.revoke(options["name"], command_actor(options["actor"]))
    command.stdout.write(f"agent {options['name']} revoked: its tunnel key removed and its session ended, its "
                         "broker user deleted, its messages refused")


SUBCOMMANDS = {
    "add": ("record an agent reached by hand (URL and token file)", _add_arguments, add),
    "list": ("every agent: state, channel, URL, last seen, version, copies running, VMs", _list_arguments, list_),
    "pause": ("take no new cycles on it; running copies go on", _name_argument, _state_change("pause")),
    "resume": ("take new cycles on it again", _name_argument, _state_change("resume")),
    "drain": ("take no new cycles on it, to remove it once its copies end", _name_argument, _state_change("drain")),
    "remove": ("forget it (refused while a VM or vCenter uses it or it copies)", _name_argument, remove),
    "pairing-code": ("a one-time code for one agent to enrol with (only its hash is kept)", _code_arguments,
                     pairing_code),
    "approve": ("give a pending agent its tunnel, its own broker user, API token and message key",
                _enrolment_arguments, approve),
    "reject": ("refuse a pending agent", _enrolment_arguments, reject),
    "revoke": ("take an agent's credentials back at once (its tunnel key removed and session ended, its broker "
               "user deleted, its connections closed)",
               _enrolment_arguments, revoke),
}


class Command(BaseCommand):
    help = "The agents (MigrateKit OSSEA's VMAs) that copy VMware sites' disks: " + ", ".join(SUBCOMMANDS)

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
        for name, (text, arguments, _) in SUBCOMMANDS.items():
            arguments(sub.add_parser(name, help=text, description=text))

    def handle(self, subcommand, **options):
        _, _, run = SUBCOMMANDS[subcommand]
        try:
            run(self, options)
        except (agents.AgentError, enrolment.EnrolmentError) as exc:
            raise CommandError(str(exc)) from exc
