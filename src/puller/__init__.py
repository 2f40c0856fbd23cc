"""puller: pulls tenants' customer, order and product exports into a SQL store."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
