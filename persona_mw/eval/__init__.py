"""Benchmark harness behind ``persona-mw eval`` (dsp, traits).

Each benchmark builds a real ``Middleware`` (SQLite store in a temporary folder, the ``profile``
plugin with the frozen ``PROFILE_SETTINGS``), feeds simulated users' choices through
``afeedback``, runs the plugin's batch refit (group discovery included), and scores held-out
items through ``persona_mw.plugins.profile.score_texts`` with the scope the graph resolves —
exactly what a deployment does. Results: ``{"benchmark", "data", "config", "metrics"}``.
"""

from persona_mw.eval.common import PROFILE_SETTINGS, print_table, write_result

__all__ = ["PROFILE_SETTINGS", "print_table", "write_result"]
