"""Scheduling, KV block management, sampling and the step loop."""
