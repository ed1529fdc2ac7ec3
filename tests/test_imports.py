"""``import persona_mw`` is light: no torch, no litellm, no socket, no network."""

from __future__ import annotations

import subprocess
import sys

CHECK = r"""
import socket, sys
opened = []
real = socket.socket.__init__
def spy(self, *a, **k):
    opened.append(a)
    real(self, *a, **k)
socket.socket.__init__ = spy
real_connect = socket.create_connection
socket.create_connection = lambda *a, **k: (_ for _ in ()).throw(AssertionError(f"network at import: {a}"))
import persona_mw, persona_mw.cli, persona_mw.middleware, persona_mw.store.sqlite, persona_mw.graph
import persona_mw.adapters.base, persona_mw.plugins.stated, persona_mw.testing
heavy = [m for m in ("torch", "transformers", "litellm", "fastapi", "uvicorn", "openai") if m in sys.modules]
assert not heavy, f"heavy modules imported: {heavy}"
assert not opened, f"sockets opened at import: {opened}"
print("ok")
"""


def test_import_is_light_and_offline():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_lazy_backend_modules_do_not_import_sdks():
    code = ("import sys, persona_mw.adapters.litellm, persona_mw.adapters.transformers, persona_mw.models;"
            "bad=[m for m in ('torch','litellm','transformers') if m in sys.modules]; assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
