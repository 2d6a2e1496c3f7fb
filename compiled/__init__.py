"""TwinFlow compiled."""
