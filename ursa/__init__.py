"""ursa: build your own image classifier from your own pictures, offline, on a laptop CPU."""

__version__ = "0.2.0"

__all__ = ["__version__"]
