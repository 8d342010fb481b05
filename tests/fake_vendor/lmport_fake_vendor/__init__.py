"""A pretend accelerator vendor's lmport backend (distribution ``lmport-fake-vendor``).

Its "device" is the CPU; what makes it a vendor backend is that its attention and KV
allocation replace the core's through hooks alone. docs/writing-a-backend.md walks through it.
"""

__version__ = "0.1.0"
