"""Test code vendored unchanged from LMCache 0.5.6 (Apache-2.0), run by tests/test_lmcache_l2_adapter.py; its
files are not named ``test_*`` so pytest never collects them (they import LMCache at module top)."""
