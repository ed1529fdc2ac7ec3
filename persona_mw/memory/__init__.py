"""Long-term user memory: tiered extraction, update logic, fused retrieval, pinned preferences.

``MemoryManager`` is the Python API (``Middleware.memory``); the ``memory`` plugin
(``persona_mw.plugins.memory``) runs it in the pipeline. No torch at import: the embedder loads lazily.
"""

from __future__ import annotations

from persona_mw.memory.extract import Candidate, detect, parse_llm_output, rule_extract, sanitize
from persona_mw.memory.index import AnnIndex, BM25Index, NumpyIndex, VectorIndex, rrf, time_hint
from persona_mw.memory.manager import MemoryHit, MemoryManager, UnknownMemoryError

__all__ = ["AnnIndex", "BM25Index", "Candidate", "MemoryHit", "MemoryManager", "NumpyIndex", "UnknownMemoryError",
           "VectorIndex", "detect", "parse_llm_output", "rrf", "rule_extract", "sanitize", "time_hint"]
