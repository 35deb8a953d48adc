"""Stand-ins for what cannot run here, shared by the tests and the benches:
a vCenter (vcenter.py runs the Go simulator in vcsim/, govmomi's library with
our CBT extensions), a CloudStack management server (cloudstack.py), and the
tiny bootable guest disk a failover boots (boot_disk.py). Not product code:
nothing under replication/ or vma_agent/ imports them."""
