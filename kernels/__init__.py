"""TwinFlow kernels."""
