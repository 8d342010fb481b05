"""The built-in CPU backend passes the conformance suite every backend runs."""

from lmport.testing.conformance import BackendConformance


class TestCpuConformance(BackendConformance):
    backend_name = "cpu"
