"""Test helpers (not part of the product package): import as ``support.X`` (pytest puts
tests/ on sys.path)."""
