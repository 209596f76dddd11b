"""The soak under faults (bench/soak): its upstream, clients, faults, analysis and report."""
