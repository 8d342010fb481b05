"""The out-of-tree fake vendor passes the same conformance suite through its own hooks."""

from lmport.testing.conformance import BackendConformance
from lmport.testing.executor_conformance import WholeModelConformance


class TestFakeVendorConformance(BackendConformance):
    backend_name = "fake"
    distribution = "lmport-fake-vendor"
    environ = {"LMPORT_FAKE_VENDOR_DEVICE": "1"}
    standard_kv_layout = True  # per-layer views of one slab keep the logical shape


class TestFakeVendorWholeModelConformance(WholeModelConformance):
    """The fake vendor as a whole-model stack (profile ``executor``): the suite for executors."""

    backend_name = "fake"
    distribution = "lmport-fake-vendor"
    environ = {"LMPORT_FAKE_VENDOR_DEVICE": "1", "LMPORT_FAKE_VENDOR_PROFILE": "executor"}
