"""A user's module that fails when imported."""
raise ImportError("cannot import name 'Thing' from 'somewhere'")
