"""A third-party style plugin module registering a PII detector through the hook (used by test_pii)."""

from __future__ import annotations

import re
from typing import Any, Callable

from persona_mw import hookimpl

_BADGE = re.compile(r"\bBADGE-\d{4}\b")


@hookimpl
def persona_register_detectors(register: Callable[[str, Any], None]) -> None:
    register("badge", lambda text: [m.span() for m in _BADGE.finditer(text)])
