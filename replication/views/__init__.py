"""The operator's pages and the JSON API, one module per area: jobs
(dashboard, job pages), vms (VM list, replicas, failover), protection
(groups, recovery points, metrics), sources (vCenters, image VMs, the cloud)
and api (JSON for scripts). Helpers the pages share are in common."""
