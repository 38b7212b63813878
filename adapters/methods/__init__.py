"""Importing this package registers every built-in method."""

from adapters.methods import lora

__all__ = ["lora"]
