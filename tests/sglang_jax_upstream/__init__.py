"""Test code vendored unchanged from sglang-jax (Apache-2.0), run by tests/test_sglang_jax_adapter.py; its files
are not named ``test_*`` so pytest never collects them (they import sgl_jax at module top)."""
