"""The out-of-tree fake vendor passes the same conformance suite through its own hooks."""

from lmport.testing.conformance import BackendConformance


class TestFakeVendorConformance(BackendConformance):
    backend_name = "fake"
    distribution = "lmport-fake-vendor"
    environ = {"LMPORT_FAKE_VENDOR_DEVICE": "1"}
    standard_kv_layout = True  # per-layer views of one slab keep the logical shape
