//! LocalCluster: N real replikv-server processes on loopback.
