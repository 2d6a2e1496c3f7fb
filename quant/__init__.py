"""TwinFlow quant."""
