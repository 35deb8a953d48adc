"""CloudStack, the cloud MigrateKit OSSEA replicates into, as a platform: its
API client, its config checked against the cloud, drift between the database
and the cloud, its volumes as replication targets, and the replicas booting
there as the failover destination."""
