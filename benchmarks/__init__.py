"""TwinFlow benchmarks."""
