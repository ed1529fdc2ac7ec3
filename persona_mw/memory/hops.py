"""A second retrieval hop for ``MemoryManager.search(mode="fused")`` (issue #20: multi-hop memory).

A multi-hop question ("What do Melanie's kids like?") names little of what its evidence says: the first
hop finds the memories that share its words or meaning, and the rest is linked to *those* (the same
people, places, activities), often in other sessions. No LLM call, no new index; on top of the first
hop's fused scores it adds:

- **pseudo-relevance feedback** (``prf_k`` seeds, ``prf_weight``): the normalised mean vector of the
  first hop's ``prf_k`` best memories scores every memory of the first hop's pool (each signal's best
  ``max(candidates, 4k)``, several hundred memories) by its stored vector, z-normalized over the pool
  and added with its weight. No embedding and no scan of the scope: the cost is the pool's, whatever
  the number of memories (a first version searched the whole dense indexes again and doubled the
  search time at 100,000 memories); a memory outside every signal's head is not reached.
- **entity links** (``link_weight``): names (capitalised words, after dropping the ones frequent in the
  pool such as the speakers) that the seeds mention and the question does not; a memory that mentions
  them gets the z-score of how many it shares.
- **speaker links** (``speaker_weight``): a memory whose speaker (``meta["speaker"]``, e.g. a stored
  turn's) the question names gets the z-score of that match: "What does Melanie paint?" reads
  Melanie's own turns first, whichever words they use.
- **focus** (``focus_weight``): when the question names a speaker of the pool ("What activities does
  Melanie partake in?"), the name pulls both hops toward every turn that *addresses* her ("Thanks,
  Melanie!") rather than the turns where she says what she does. The question less those names ("What
  activities does partake in?") is embedded once more and scores the pool by each memory's stored
  vector and its turn window's vector (mean of the two z-scores, times the weight); who said it is left
  to the speaker links. One extra embedding, only for questions naming a speaker; no index scan.
- **session spread** (``session_penalty``): the ``k`` results are picked greedily, each further memory of
  an already picked session (its date) losing ``session_penalty``: evidence spread over sessions is
  not crowded out by the neighbours of one good turn. ``list_penalty``: the same, used instead when it
  is larger and the question asks for a list (``is_list_question``, an English-only heuristic: "What
  books has ...", "Which cities ...", "How many ...", "... both ...").
- **maximal marginal relevance** (``mmr``, ``mmr_lists_only``): each pick also loses ``mmr`` times its
  highest cosine with the memories already picked. Kept as an option; cross-validation did not choose
  it (docs/notes/multihop.md, stop 31).

Each hit's ``why`` says ``hop``: 1 when the first hop alone ranked it in the top ``k``, 2 when the second
hop brought it there, with the ``prf`` and ``focus`` z-scores and the ``links`` it shares. The settings are chosen by
cross-validation (``persona-mw eval locomo --folds K``), never on a whole-dev figure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from persona_mw.memory.manager import MemoryHit, _MemoryRetrieval

_NAME = re.compile(r"\b[A-Z][A-Za-z'\u2019-]{2,}\b")
# capitalised words that are not names (sentence starts, pronouns, days and months are dates' business)
_NOT_NAMES = frozenset("""
the this that these those what when where which who whom whose why how and but for not yes yeah wow
its it's i'm i've i'd i'll you you're we we're they they're she he his her hers him our ours your
there here then also just well thanks thank sure okay hey hello haha awesome great nice cool really
did does do was were will would can could should have has had been being are is am been so oh aww omg
it let let's
monday tuesday wednesday thursday friday saturday sunday january february march april may june july
august september october november december
""".split())


@dataclass(frozen=True)
class HopSettings:
    """The second hop's settings (all off: ``search`` is the single-pass ``fused`` search)."""

    prf_k: int = 0
    prf_weight: float = 0.0
    link_weight: float = 0.0
    session_penalty: float = 0.0
    speaker_weight: float = 0.0
    mmr: float = 0.0
    mmr_lists_only: bool = False
    focus_weight: float = 0.0
    list_penalty: float = 0.0

    @property
    def active(self) -> bool:
        return ((self.prf_k > 0 and (self.prf_weight > 0 or self.link_weight > 0)) or self.session_penalty > 0
                or self.speaker_weight > 0 or self.mmr > 0
                or self.focus_weight > 0 or self.list_penalty > 0)

    @classmethod
    def of(cls, value: HopSettings | dict[str, Any] | None) -> HopSettings:
        """``None``: the shipped default (``DEFAULT_HOPS``); a dict: its keys, the others 0 (``{}``: one hop)."""
        if value is None:
            return DEFAULT_HOPS
        if isinstance(value, HopSettings):
            return value
        bad = sorted(set(value) - set(cls.__dataclass_fields__))
        if bad:
            raise ValueError(f"unknown hop settings {', '.join(bad)}")
        return cls(**value)


# The shipped default of ``MemoryManager(hops=None)`` and of the memory plugin: the setting the inner
# selection of ``persona-mw eval locomo --folds 5`` picks on all of dev (benchmarks/results/cv5_locomo_s31.json,
# chosen by 4 of the 5 folds; docs/notes/multihop.md says how it was chosen). Before stop 31: prf_k 3,
# prf_weight 0.25, link_weight 0.5, speaker_weight 1.0, session_penalty 0.1, no focus.
DEFAULT_HOPS = HopSettings(prf_k=1, prf_weight=0.5, link_weight=0.0, speaker_weight=1.0, session_penalty=0.0,
                           focus_weight=4.0)


_POSSESSIVE = re.compile(r"['\u2019]s?$")


def names(text: str) -> set[str]:
    """Lower-cased capitalised words of ``text`` that may name someone or something.

    A possessive is its name ("Melanie's kids" names ``melanie``): questions ask about someone's
    things far more often than they name them bare, and the speaker links compare these names
    with ``meta["speaker"]``."""
    out: set[str] = set()
    for word in _NAME.findall(text):
        w = word.lower()
        if w in _NOT_NAMES:  # "It's", "That's": a sentence word, with or without its 's
            continue
        w = _POSSESSIVE.sub("", w)
        if w and w not in _NOT_NAMES:
            out.add(w)
    return out


def without_names(text: str, drop: set[str]) -> str:
    """``text`` without the names ``drop`` (as ``names`` reads them, possessive included):
    "What do Melanie's kids like?" without ``{"melanie"}`` -> "What do kids like?"."""
    out = _NAME.sub(lambda m: "" if _POSSESSIVE.sub("", m.group(0).lower()) in drop else m.group(0), text)
    return re.sub(r"\s+", " ", out).strip()


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std()) if len(x) else 0.0
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


def _centroid(mgr: _MemoryRetrieval, seeds: Sequence[tuple[str, str]]) -> np.ndarray | None:
    by_node: dict[str, list[str]] = {}
    for node, mid in seeds:
        by_node.setdefault(node, []).append(mid)
    vecs = [v for node, ids in by_node.items() for v in mgr._vectors(node, ids).values()]
    if not vecs:
        return None
    c = np.mean(np.asarray(vecs, dtype=np.float32), axis=0)
    n = float(np.linalg.norm(c))
    return c / n if n > 0 else None


def grouped_sims(keys: Sequence[tuple[str, str]], dot: Any) -> np.ndarray | None:
    """``dot(node, ids)`` asked once per node for its ``(node, id)`` keys, in ``keys``' order; a key with
    no vector (NaN) gets the lowest score found; None when no key has one."""
    by_node: dict[str, list[int]] = {}
    for j, (node, _) in enumerate(keys):
        by_node.setdefault(node, []).append(j)
    sims = np.full(len(keys), np.nan)
    for node, js in by_node.items():
        sims[js] = dot(node, [keys[j][1] for j in js])
    if not len(keys) or np.isnan(sims).all():
        return None
    return np.where(np.isnan(sims), float(np.nanmin(sims)), sims)


def _pool_sims(mgr: _MemoryRetrieval, keys: list[tuple[str, str]], c: np.ndarray) -> np.ndarray:
    """Cosine of each pool memory's stored vector with ``c`` (no vector: the pool's lowest)."""
    sims = grouped_sims(keys, lambda node, ids: mgr._dot(node, ids, c))
    return np.zeros(len(keys)) if sims is None else sims


def _focus(mgr: _MemoryRetrieval, keys: list[tuple[str, str]], query: str, drop: set[str]) -> np.ndarray | None:
    """The pool re-scored densely with the question less the speakers it names: the mean of the z-scores of
    each memory's stored vector and of its turn window's vector with the embedding of that rest. None when
    the question names no speaker of the pool (nothing is embedded then)."""
    rest = without_names(query, drop) if drop else ""
    if not rest or rest == query:
        return None
    got = mgr._embed([rest])
    if got is None:
        return None
    v = np.asarray(got, dtype=np.float32)[0]
    n = float(np.linalg.norm(v))
    if n <= 0:
        return None
    v = v / n
    z = _z(_pool_sims(mgr, keys, v))
    win = mgr._window_sims(keys, v)
    return z if win is None else (z + _z(win)) / 2.0


def _links(mgr: _MemoryRetrieval, keys: list[tuple[str, str]], seeds: set[tuple[str, str]],
           query: str) -> tuple[np.ndarray, list[list[str]]]:
    """How many of the seeds' names (not the query's, not frequent in the pool) each key mentions."""
    ents = [mgr._names_of(n, i) for n, i in keys]
    df: dict[str, int] = {}
    for e in ents:
        for w in e:
            df[w] = df.get(w, 0) + 1
    common = {w for w, c in df.items() if c > max(3, len(keys) // 10)}
    bridge = set().union(*(e for e, key in zip(ents, keys) if key in seeds)) - names(query) - common
    shared = [sorted(e & bridge) for e in ents]
    return np.asarray([min(3, len(s)) for s in shared], dtype=np.float64), shared


# English-only heuristic: a question that asks for several things ("What activities does Melanie partake
# in?", "Which cities has Jon visited?", "Where has Melanie camped?", "How many times ...", "What have
# Caroline and Melanie both painted?"): what/which and a plural noun before the verb, "what/where has",
# "how many", or "both"/"all the"/"some".
_LIST_Q = re.compile(
    r"^\s*(?:(?:what|which)\s+(?:kinds?\s+of\s+|types?\s+of\s+|sorts?\s+of\s+)?(?:[\w+/-]+\s+){0,2}?"
    r"[\w+/-]*[a-z]{2}s\s+(?:has|have|does|do|did|is|are|was|were)\b"
    r"|(?:where|what)\s+(?:has|have)\b|how\s+many\b)"
    r"|\b(?:both|all\s+the|some)\b", re.IGNORECASE)


def is_list_question(query: str) -> bool:
    """Whether ``query`` asks for a list of things (English-only heuristic, ``_LIST_Q``)."""
    return bool(_LIST_Q.search(query))


def _spread(score: np.ndarray, sessions: list[Any], k: int, penalty: float,
            vecs: Any = None, mmr: float = 0.0) -> list[int]:
    """The ``k`` best indices, greedily: each further pick from an already picked session loses
    ``penalty``, and (maximal marginal relevance) each pick loses ``mmr`` times its highest cosine with
    the memories already picked. ``vecs(indices)``: the unit stored vectors of those indices (a row of
    zeros where there is none: no redundancy counted)."""
    order = list(np.argsort(-score, kind="stable")[: max(5 * k, k + 20)])
    if penalty <= 0 and (mmr <= 0 or vecs is None):
        return order[:k]
    cand = np.asarray(order)
    base = score[cand].astype(np.float64)
    sess = [sessions[i] for i in order]
    use_mmr = mmr > 0 and vecs is not None
    v = vecs(order) if use_mmr else None
    red = np.full(len(order), -np.inf)  # highest cosine with a picked memory so far
    taken: dict[Any, int] = {}
    alive = np.ones(len(order), dtype=bool)
    out: list[int] = []
    while alive.any() and len(out) < k:
        adj = base.copy()
        if penalty > 0:
            adj -= penalty * np.asarray([taken.get(s_, 0) if s_ is not None else 0 for s_ in sess], dtype=np.float64)
        if v is not None and out:
            adj -= mmr * np.maximum(red, 0.0)
        adj[~alive] = -np.inf
        j = int(np.argmax(adj))
        alive[j] = False
        out.append(int(cand[j]))
        if sess[j] is not None:
            taken[sess[j]] = taken.get(sess[j], 0) + 1
        if v is not None:
            red = np.maximum(red, v @ v[j])
    return out


def second_hop(mgr: _MemoryRetrieval, query: str, first: tuple[list[tuple[str, str]], np.ndarray, dict[str, np.ndarray]],
               k: int, hops: HopSettings) -> list[MemoryHit]:
    """The first hop's pool ``first`` (keys, fused scores, z per signal) re-ranked with a second hop."""
    from persona_mw.memory.manager import MemoryHit, _session_of

    keys1, total1, zs1 = first
    order1 = np.argsort(-total1, kind="stable")
    top1 = {keys1[i] for i in order1[:k]}
    seeds = [keys1[i] for i in order1[: hops.prf_k]]
    keys = keys1
    arr = np.asarray(total1, dtype=np.float64)
    speakers = [str(mgr._recs[n][i].meta.get("speaker") or "").split(" ")[0].lower() for n, i in keys]
    prf: dict[tuple[str, str], float] = {}
    c = _centroid(mgr, seeds) if hops.prf_k > 0 and hops.prf_weight > 0 else None
    if c is not None:
        sims = _pool_sims(mgr, keys, c)
        z = _z(sims)
        prf = {key: float(v) for key, v in zip(keys, z)}
        arr = arr + hops.prf_weight * z
    shared: list[list[str]] = [[] for _ in keys]
    if hops.link_weight > 0 and seeds:
        count, shared = _links(mgr, keys, set(seeds), query)
        arr = arr + hops.link_weight * _z(count)
    if hops.speaker_weight > 0:
        asked = names(query)
        said = np.asarray([float(sp in asked) for sp in speakers])
        arr = arr + hops.speaker_weight * _z(said)
    focus: dict[tuple[str, str], float] = {}
    if hops.focus_weight > 0:
        fz = _focus(mgr, keys, query, names(query) & set(speakers))
        if fz is not None:
            focus = {key: float(x) for key, x in zip(keys, fz)}
            arr = arr + hops.focus_weight * fz
    sessions = [_session_of(mgr._recs[n][i]) for n, i in keys]
    pos1 = {key: j for j, key in enumerate(keys1)}
    out: list[MemoryHit] = []
    mmr = hops.mmr if hops.mmr > 0 and (not hops.mmr_lists_only or is_list_question(query)) else 0.0

    def unit_vectors(idx: list[int]) -> np.ndarray:
        got: dict[tuple[str, str], np.ndarray] = {}
        by_node: dict[str, list[str]] = {}
        for i in idx:
            by_node.setdefault(keys[i][0], []).append(keys[i][1])
        for node, ids in by_node.items():
            got.update({(node, mid): vec for mid, vec in mgr._vectors(node, ids).items()})
        dim = len(next(iter(got.values()))) if got else 1
        out = np.zeros((len(idx), dim))
        for r, i in enumerate(idx):
            vec = got.get(keys[i])
            if vec is not None:
                n = float(np.linalg.norm(vec))
                out[r] = vec / n if n > 0 else 0.0
        return out

    penalty = hops.session_penalty
    if hops.list_penalty > 0 and is_list_question(query):
        penalty = max(penalty, hops.list_penalty)
    for i in _spread(arr, sessions, k, penalty, unit_vectors if mmr > 0 else None, mmr):
        key = keys[i]
        why: dict[str, Any] = {"node": key[0], "hop": 1 if key in top1 else 2}
        j = pos1.get(key)
        if j is not None:
            why.update({name: round(float(z[j]), 3) for name, z in zs1.items()})
        if key in prf:
            why["prf"] = round(prf[key], 3)
        if key in focus:
            why["focus"] = round(focus[key], 3)
        if shared[i]:
            why["links"] = shared[i]
        out.append(MemoryHit(mgr._recs[key[0]][key[1]].model_copy(), float(arr[i]), why))
    return out
