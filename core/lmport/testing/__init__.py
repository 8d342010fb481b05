"""Test helpers any backend distribution can use: a pytest plugin and a conformance suite."""
