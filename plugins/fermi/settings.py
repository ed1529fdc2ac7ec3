"""The fermi plugin's settings (``Fermi.Config``) and its built-in library of style instructions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from persona_mw.placement import Placement

# Generic style instructions scored as candidates (``styles`` in the config replaces them): the
# common axes along which people's preferences differ (length, reading level, tone, register,
# framing, format). The scorer keeps the ones the user's own choices support.
STYLE_LIBRARY: tuple[str, ...] = (
    "I like short, concise answers.",
    "I like detailed, thorough answers.",
    "I like plain, simple words, as if explained to a beginner.",
    "I like expert-level, technical answers.",
    "I like a warm, friendly tone.",
    "I like playful, humorous, fun answers.",
    "I like a formal, professional tone.",
    "I like scholarly, academic answers that explain the evidence.",
    "I like practical, business-minded answers focused on results.",
    "I like poetic, vivid, descriptive language.",
    "I like answers told as a story.",
    "I like step-by-step answers with lists.",
    "I like neutral, objective, balanced answers.",
    "I like enthusiastic, energetic answers.",
    "I like answers with concrete examples.",
)


class Config(BaseModel):
    """Settings of one `- use: fermi` pipeline entry (``Fermi.Config``)."""

    model_config = ConfigDict(extra="forbid")
    placement: Placement = Field(
        default="user_prefix",
        description="where the prompt goes (the 135M local model heeds the user turn, not the system message)")
    optimizer_role: str = Field(default="optimizer", description="roles: entry of the optimizer LLM")
    judge_role: str = Field(default="judge", description="roles: entry of the judge (black-box scoring)")
    scorer: Literal["auto", "whitebox", "judge"] = Field(
        default="auto", description="auto: white-box on a local transformers backend, else the judge")
    background: bool = Field(default=True, description="optimize off the feedback path")
    every: int = Field(default=1, ge=1, description="optimize after every k-th choice/edit of a node")
    optimizer_calls: int = Field(default=2, ge=0, le=64, description="optimizer proposals per job")
    max_aux_calls: int | None = Field(
        default=None, ge=0, le=1000,
        description="job budget: optimizer + judge calls (default: the config's budget.aux_calls_per_job)")
    job_seconds: float | None = Field(default=120.0, gt=0, description="job budget: wall-clock seconds")
    optimizer_timeout: float = Field(default=30.0, gt=0, description="seconds per optimizer call")
    optimizer_max_tokens: int = Field(default=80, ge=8, le=1024, description="new tokens per optimizer proposal")
    max_examples: int = Field(default=32, ge=1, le=1000, description="newest choices a node is scored on")
    max_rejected: int = Field(default=4, ge=1, le=16, description="rejected answers per choice scored")
    max_response_tokens: int = Field(default=32, ge=4, le=1024, description="answer tokens scored (white-box)")
    judge_pairs: int = Field(default=6, ge=1, le=100, description="choices a judge scores per prompt")
    memory_size: int = Field(default=8, ge=2, le=64, description="prompts kept per node")
    min_gain: float = Field(default=0.0, ge=0.0, description="a new prompt must beat the current by more")
    min_z: float = Field(
        default=1.64, ge=0.0, le=10.0,
        description="a new prompt must beat the current (first: the persona prompt) by this many paired "
                    "standard errors over the same choices (1.64: one-sided 5%; 0: any gain)")
    retrieve_k: int = Field(default=5, ge=0, le=100, description="similar recorded queries (0: node's best only)")
    min_similarity: float = Field(default=0.1, ge=0.0, le=1.0,
                                   description="least similarity of a recorded query to count as similar")
    retrieve_prior: float = Field(
        default=10.0, ge=0.0, le=1000.0,
        description="pseudo-count of the node-wide score when ranking prompts on the similar queries "
                    "(0: the similar queries alone; higher: closer to the node's best)")
    groups: bool = Field(default=True, description="also optimize the user's groups from their members' choices")
    min_share: float = Field(default=0.2, ge=0.0, le=1.0, description="a node's scope weight needed to contribute")
    max_prompt_chars: int = Field(default=600, ge=40, le=8000, description="prompts longer are cut")
    keywords: int = Field(default=8, ge=0, le=50, description="distinctive words in keyword proposals")
    styles: list[str] | None = Field(
        default=None, max_length=64,
        description="style instructions scored as candidates (default: the built-in STYLE_LIBRARY with the "
                    "white-box scorer, none with a judge; [] for none)")
    cache_size: int = Field(default=64, ge=0, le=1000,
                            description="prompts whose per-choice scores are kept to skip rescoring (0: none)")
    style_pairs: int = Field(default=2, ge=0, le=10,
                             description="after scoring, combine the best styles pairwise (this many combinations)")
