"""The package version (a module of its own: `flextron/__init__` imports `export`, which records it)."""

__version__ = "0.1.0"
