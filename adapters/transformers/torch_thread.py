"""The one torch worker thread of the process, and how work is sent to it (cancellably)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

# All torch work of every backend in this process runs here (see the package docstring).
TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persona-mw-torch")

T = TypeVar("T")


async def _on_torch_thread(fn: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(TORCH_THREAD, functools.partial(ctx.run, fn, *args))


async def _cancellable(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args, cancel)`` on the torch thread; if the awaiting task is cancelled (a client that went
    away, a timeout), ``cancel`` is set and the generation loop stops at its next step instead of
    running to ``max_new_tokens`` while every later request waits for the thread."""
    cancel = threading.Event()
    try:
        return await _on_torch_thread(fn, *args, cancel)
    except asyncio.CancelledError:
        cancel.set()
        raise
