"""FERMI-style per-node prompt optimization (Kim & Yang 2025), online from the user's choices.

Every user (and user-in-context, and group) node keeps a *memory* of candidate prompts: each with
its score on the node's recorded choices, per-example margins, and the mis-aligned examples it got
wrong. After ``choice``/``edit`` feedback a background job (``Middleware.schedule``, bounded by a
``job_budget``) proposes new candidates and scores them the same way; a candidate replaces the
current prompt only if its score beats the current one's on the same examples.

Proposals come from two sources:

- deterministic (no model call): the persona prompt (stated preferences + persona statements), the
  words that distinguish the user's chosen answers from the rejected ones, length/structure
  preferences, the opening of a typical chosen answer (user nodes only), and a fix of the best
  prompt from the words of its mis-aligned examples;
- an optimizer LLM (role ``optimizer``, default the main backend), shown the memory (prompts with
  scores, mis-aligned examples, stated preferences) through our own meta-prompt. Each call spends
  from the job's budget; a failing or slow optimizer is recorded and the job goes on.

Scoring (``Score``): on a white-box backend (local transformers), for every recorded choice
``(query, chosen, rejected[])`` the mean per-token log-likelihood of each answer given the prompt
placed as at request time; ``margin`` = mean over rejected of ``lp(chosen) - lp(rejected)`` and
``accuracy`` = share of rejected answers below the chosen one. Batched, with the shared prefix's
KV cache reused. On black-box backends a judge (role ``judge``) compares chosen and rejected under
the prompt in both orders (+1 / 0 / -1 per pair), each call from the job's budget.

At request time (``persona_rewrite``) the plugin retrieves the node's recorded queries most similar
to the new one (bag of words, cosine) and uses the memory prompt with the best margin on them
(FERMI's retrieval of prompts), else the node's best prompt; user and group prompts are combined
by the scope's weights. The trace says which prompt, of which node, and why.

State: ``Profile.extra[<name>]`` (memory, history, errors) and ``Profile.prompt`` (the current
best), so it is persisted, exported and forgotten with the node. Group memories keep no member
texts (only prompts, scores and per-event margins); their word lists need support from two members.

The package: ``plugin`` (the ``Fermi`` class and its hooks), ``optimize`` (one job, in steps),
``proposals`` (candidate prompts and the optimizer's meta-prompt), ``scoring`` (examples, scores,
the white-box and judge scorers), ``terms`` (word features), ``settings`` (``Fermi.Config``,
``STYLE_LIBRARY``), ``report`` (``profile show``'s prompts).
"""

from __future__ import annotations

from .optimize import OptimizationJob
from .plugin import Fermi, log
from .proposals import Proposals
from .report import prompt_report, prompt_reports
from .scoring import Example, JudgeScorer, Score, WhiteBoxScorer, cache_key, paired_z, place
from .settings import STYLE_LIBRARY, Config
from .terms import distinctive_terms

__all__ = ["STYLE_LIBRARY", "Config", "Example", "Fermi", "JudgeScorer", "OptimizationJob", "Proposals", "Score",
           "WhiteBoxScorer", "cache_key", "distinctive_terms", "log", "paired_z", "place", "prompt_report",
           "prompt_reports"]
