"""Real infrastructure the tests start on this machine (network namespaces as hosts, sshd)."""
