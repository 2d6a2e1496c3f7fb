"""TwinFlow models."""
