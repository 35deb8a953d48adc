"""The CloudStack config model (MigrateKit OSSEA's ossea_configs). The platform
itself (client, volumes, destination) is replication.platforms.cloudstack."""
