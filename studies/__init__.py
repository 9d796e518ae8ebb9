"""Empirical studies built on the gradharmony package (not part of the installed package)."""
