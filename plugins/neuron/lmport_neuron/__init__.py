"""lmport's AWS Neuron backend (distribution ``lmport-neuron``)."""

__version__ = "0.1.0"
