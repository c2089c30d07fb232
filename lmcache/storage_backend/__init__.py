"""Storage backends of LMCache; this package provides the memory pools (:mod:`.mem_pool`)."""
