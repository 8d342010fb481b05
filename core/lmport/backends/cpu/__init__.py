"""The built-in CPU backend: a plugin like any other, registered through the same hooks."""
