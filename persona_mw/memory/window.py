"""``WindowRetriever``: kept as a thin wrapper; the method now lives in ``MemoryManager.search``.

Score fusion over two granularities (each memory alone, each raw turn with its same-session neighbours;
BM25 and MiniLM; z-normalized scores summed) is ``MemoryManager.search(..., mode="fused")``, the default
mode and what the ``memory`` plugin ships. This wrapper searches the same indexes, limited to the stored
turns (``episode`` memories) of the user's scope, for code written against the old class.
"""

from __future__ import annotations

from persona_mw.memory.manager import MemoryHit, MemoryManager


class WindowRetriever:
    """``manager.search(user, query, k, mode="fused", kinds=("episode",))`` (see the module docstring)."""

    def __init__(self, manager: MemoryManager, window: int = 1) -> None:
        if window != manager.neighbours:
            raise ValueError(f"the manager indexes windows of ±{manager.neighbours} turns "
                             f"(MemoryManager(neighbours=...)), not ±{window}")
        self.manager = manager
        self.window = window

    def search(self, user: str, query: str, k: int = 10) -> list[MemoryHit]:
        return self.manager.search(user, query, k, mode="fused", kinds=("episode",))


__all__ = ["WindowRetriever"]
