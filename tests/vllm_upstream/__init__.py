"""Test code vendored unchanged from vLLM (Apache-2.0), run by tests/test_vllm_adapter.py; its files are
not named ``test_*`` so pytest never collects them (they import vllm at module top)."""
