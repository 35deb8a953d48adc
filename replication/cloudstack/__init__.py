"""CloudStack (the seeds' OSSEA) as the destination cloud: its config, its
API client, its volumes as replication targets."""
