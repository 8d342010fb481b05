"""Backends built into the core (only ``cpu``); others are separate distributions."""
