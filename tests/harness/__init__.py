"""A real Tailscale network on one machine, offline, for tests and benchmarks."""
