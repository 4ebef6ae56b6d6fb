"""The built-in CA: root and plugged-in CAs (authority), X.509-SVIDs (svid), renewal and root
rotation (rotation), workload tokens (tokens), the CSR signing service (service) and the
cert agent (agent). Import the submodules directly; this package imports nothing."""
