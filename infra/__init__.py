"""Developer and CI tooling for Trace (local services, demo, benchmarks); not in the wheel."""
