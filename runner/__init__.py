"""TwinFlow runner."""
