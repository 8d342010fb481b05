"""pytest plugin (``pytest11`` entry point ``lmport``): fixtures for backend tests."""
