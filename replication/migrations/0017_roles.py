# Roles (viewer, operator, administrator) as groups with permissions, and who asked for a drill.

from django.db import migrations, models


def create_roles(apps, schema_editor):
    from replication.roles import ensure_roles

    # The model permissions of the admin come with post_migrate on a fresh
    # database; post_migrate runs ensure_roles again and completes the group.
    ensure_roles(apps)


class Migration(migrations.Migration):

    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("replication", "0016_disk_waiting_seen_at"),
    ]

    operations = [
        migrations.CreateModel(
            name="Role",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
            ],
            options={
                "permissions": [
                    ("read", "Read every page and the JSON API"),
                    ("operate", "Replicate, cancel, retry and limit jobs; test failovers; drills"),
                    ("administer", "Live failover, rollback, sources, vCenters, clouds, agents, users, tokens, "
                                   "settings"),
                ],
                "managed": False,
                "default_permissions": (),
            },
        ),
        migrations.AddField(
            model_name="drillrun",
            name="requested_by",
            field=models.CharField(default="schedule", help_text="Who asked for the drill (its group's schedule, "
                                                                 "or a user)", max_length=100),
        ),
        migrations.RunPython(create_roles, migrations.RunPython.noop),
    ]
