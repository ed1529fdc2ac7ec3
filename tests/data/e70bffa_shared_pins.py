"""How tests/data/e70bffa_shared_pins.json was made: run on commit e70bffa (before the text
features, prompt placement and reward calling moved to core) as
``python tests/data/e70bffa_shared_pins.py``. It imports the old modules (``persona_mw.plugins._text``,
``persona_mw.plugins._placement``), so it does not run on later commits; it is kept to show what the pins are."""
# ruff: noqa
# mypy: ignore-errors
import json, asyncio
from persona_mw import features as F
from persona_mw.plugins import _text as T
from persona_mw.plugins._placement import place_block
from persona_mw.plugins.fermi import place as fplace
from persona_mw.types import Message

TEXTS = [
 "The Eiffel Tower is a wrought iron tower in Paris. It was built in 1889!",
 "Hey, you're gonna love this: it's super easy 😀. Really? Yes!\n\n- one\n- two\n1. first\n2) second",
 "## Summary:\nTherefore, the consequently derived methodology is, however, unnecessarily complicated.\n\n```python\nprint(1)\n```\nUse `x` and `y`.",
 "¿Dónde está la biblioteca? Está cerca de la estación, y es muy grande.",
 "Привет, как дела? Всё хорошо.",
 "",
]
out = {"features": [], "text": [], "lang": [], "targets": [], "fit": [], "terms": [], "place": [], "rewards": {}}
for t in TEXTS:
    out["features"].append({"words": F.words(t), "fk": F.flesch_kincaid_grade(t),
        "syll": [F.count_syllables(w) for w in F.words(t)],
        "style": F.style_features(t), "vector": [float(x) for x in F.style_vector(t)],
        "hash": [float(x) for x in F.NgramHasher(64).transform_one(t)]})
    out["text"].append({"words": T.words(t), "sentences": T.sentences(t), "style": T.style_features(t)})
    out["lang"].append(T.detect_language(t))
    out["terms"].append(sorted(T.content_terms(t)))
STMTS = [("Answer in one short sentence.", "like"), ("no emojis", "like"), ("Use bullet points and a formal tone", "like"),
         ("Explain simply, like I'm five, with code", "like"), ("long detailed answers", "avoid"), ("under 50 words please", "like")]
for s, p in STMTS:
    out["targets"].append([s, p, T.style_targets(s, p), list(T.polarity_of(s, p))])
    out["fit"].append([T.style_fit(T.style_features(t), T.style_targets(s, p)) for t in TEXTS])
out["coverage"] = [[T.coverage(t, s) for s, _ in STMTS] for t in TEXTS]
MSGS = [[{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]]
for ms in MSGS:
    msgs = [Message(**m) for m in ms]
    for pl in ("user_suffix", "user_prefix", "system"):
        for note in (None, "(note)"):
            out["place"].append(["block", ms, pl, note, [m.model_dump(mode="json") for m in place_block(msgs, "BLOCK", pl, system_note=note)]])
        out["place"].append(["fermi", ms, pl, None, [m.model_dump(mode="json") for m in fplace(msgs, "PROMPT", pl)]])
    out["place"].append(["fermi", ms, "user_suffix", "", [m.model_dump(mode="json") for m in fplace(msgs, "", "user_suffix")]])
OLD1 = out

# ---- part 2: contrast placement, rerank and corrector scores
import json, asyncio, tempfile, os
from types import SimpleNamespace
from persona_mw import Middleware, parse_config
from persona_mw.testing import ScriptedBackend
from persona_mw.types import Message
import persona_mw.plugins.contrast as C

out = {"contrast": [], "rerank": None, "corrector": None}
C.scope_preferences = lambda turn, inc: [("Be brief.", "like"), ("emojis", "avoid")]
MSGS = [[{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]]
for ms in MSGS:
    for pl in ("user_suffix", "system"):
        p = C.Contrast(C.Contrast.Config(placement=pl))
        turn = SimpleNamespace(scope=object(), stash={}, note=lambda s: None)
        got = p.persona_rewrite(turn, [Message(**m) for m in ms])
        out["contrast"].append([ms, pl, [m.model_dump(mode="json") for m in got]])

CANDS = ["Sure! 😀 Here's a long and detailed walk through everything you could possibly want to know about tea, with lots of words.",
         "Green tea is lightly processed.",
         "- Green tea: unoxidised\n- Black tea: oxidised\nTherefore they differ.",
         "Tea comes from Camellia sinensis; black tea is fully oxidised, green tea is not, oolong sits between."]
d = tempfile.mkdtemp()
def mk(yaml):
    cfg = parse_config(yaml); cfg.store.path = os.path.join(d, f"s{len(os.listdir(d))}.db")
    it = iter(CANDS)
    class B(ScriptedBackend):
        async def generate(self, messages, *, n=1, params=None, decoding=None):
            from persona_mw.types import Candidate
            return [Candidate(text=c, index=i) for i, c in enumerate(CANDS[:n])]
    return Middleware(cfg, backend=B(), autoload=False)
mw = mk("graph:\n  groups:\n    acme: {stated: ['Use bullet points.', 'Be formal.'], members: [ana]}\npipeline:\n  - use: rerank\n    n: 4\n    rewards: {style: 1.0, stated: 0.5}\n")
mw.state("Keep your answers short and concise.", user="ana")
mw.state("no emojis", user="ana")
r = mw.chat(user="ana", messages="Tell me about tea.")
out["rerank"] = {"scores": r.trace.scores, "text": r.text}
mw.close()
mw = mk("graph:\n  groups:\n    acme: {stated: ['Use bullet points.', 'Be formal.'], members: [ana]}\npipeline:\n  - use: corrector\n    rewards: {style: 1.0, stated: 0.5}\n")
mw.state("Keep your answers short and concise.", user="ana")
mw.state("no emojis", user="ana")
plug = next(p.instance for p in mw.host.pipeline if p.instance.name == "corrector")
orig = plug.reward
captured = {}
async def wrapped(turn, texts):
    captured["all"] = await orig(turn, CANDS)
    return await orig(turn, texts)
plug.reward = wrapped
try:
    r = mw.chat(user="ana", messages="Tell me about tea.")
    out["corrector"] = {"trace": r.trace.scores, "all": captured["all"]}
except Exception as e:
    out["corrector"] = repr(e)
mw.close()
OLD1.update(out)
print(json.dumps(OLD1, ensure_ascii=False, separators=(",", ":")))
