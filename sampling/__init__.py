"""TwinFlow sampling."""
