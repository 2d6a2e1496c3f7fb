"""The TwinFlow version (pyproject's `[project] version`): the package root and the CLI read it here."""
__version__ = "0.1.0"
