"""lrjax.search: FSAP arch_hash, the compiled memory model, the evolutionary search under a budget."""
import hashlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lrjax import search as S

CODE = '''def block(x, w):  # a block
    h = x @ w["fc1"]
    return gelu(h) @ w["fc2"]
'''


def _fsap_reference(text):
    return hashlib.md5("".join(c for c in text if c not in " \t\n\r").encode()).hexdigest()


# --------------------------------------------------------------------------- arch_hash
def test_arch_hash_is_fsap_md5():
    assert S.arch_hash(CODE) == _fsap_reference(CODE)
    assert len(S.arch_hash(CODE)) == 32
    spec = {"embed": 64, "depth": 3, "rank_ratio": 0.5}
    assert S.arch_hash(spec) == _fsap_reference('{"depth": 3, "embed": 64, "rank_ratio": 0.5}')


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(CODE)), st.text(alphabet=" \t\n\r", min_size=1, max_size=4)),
                max_size=12))
def test_arch_hash_invariant_to_whitespace_insertion(inserts):
    code = CODE
    for pos, ws in sorted(inserts, reverse=True):
        code = code[:pos] + ws + code[pos:]
    assert S.arch_hash(code) == S.arch_hash(CODE)


def test_arch_hash_spec_key_order_and_formatting():
    a = {"embed": 64, "depth": [1, 2], "act": "gelu"}
    b = {"act": "gelu", "depth": (1, 2), "embed": 64}
    assert S.arch_hash(a) == S.arch_hash(b)
    assert S.arch_hash(a) != S.arch_hash({**a, "embed": 48})
    assert S.arch_hash(CODE) != S.arch_hash(CODE.replace("fc2", "fc3"))


def test_arch_hash_known_collision_class():
    # documented: whitespace inside string literals is removed too
    assert S.arch_hash('act = "a b"') == S.arch_hash('act = "ab"')
    assert S.arch_hash({"act": "gelu new"}) == S.arch_hash({"act": "gelunew"})
    # and text is not normalized beyond whitespace: 1 vs 1.0, True vs 1 differ
    assert S.arch_hash({"r": 1}) != S.arch_hash({"r": 1.0})
    assert S.arch_hash({"r": True}) != S.arch_hash({"r": 1})


def test_arch_hash_strip_comments():
    bare = CODE.replace("  # a block", "")
    assert S.arch_hash(CODE) != S.arch_hash(bare)
    assert S.arch_hash(CODE, strip_comments=True) == S.arch_hash(bare)
    assert S.arch_hash("x = '# not a comment'", strip_comments=True) == S.arch_hash("x='#notacomment'")


def test_arch_hash_bad_input():
    with pytest.raises(TypeError, match="spec_or_code"):
        S.arch_hash(b"x = 1")
    with pytest.raises(TypeError, match="spec_or_code"):
        S.arch_hash(3)
    with pytest.raises(TypeError, match="spec_or_code"):
        S.arch_hash({"w": np.ones(2)})
    with pytest.raises(TypeError, match="strip_comments"):
        S.arch_hash(CODE, strip_comments="yes")
    with pytest.raises(ValueError, match="strip_comments"):
        S.arch_hash({"a": 1}, strip_comments=True)
    with pytest.raises(ValueError, match="strip_comments"):
        S.arch_hash('x = """unterminated', strip_comments=True)


# --------------------------------------------------------------------------- memory model
def test_peak_memory_fields():
    a, b = jax.ShapeDtypeStruct((4, 8), jnp.float32), jnp.ones((8, 3), jnp.float32)
    m = S.memory_analysis(lambda a, b: jnp.tanh(a @ b), a, b)
    assert m["argument_size_in_bytes"] == (4 * 8 + 8 * 3) * 4
    assert m["output_size_in_bytes"] == 4 * 3 * 4
    assert m["peak"] == (m["argument_size_in_bytes"] + m["output_size_in_bytes"] + m["temp_size_in_bytes"]
                         - m["alias_size_in_bytes"])
    assert S.peak_memory(lambda a, b: jnp.tanh(a @ b), a, b) == m["peak"]


def test_peak_memory_monotone_on_a_toy():
    """A factorized linear's compiled peak grows with width and with rank."""
    def fn(x, v, u):
        return jnp.tanh(jnp.sin(x @ v) @ u)

    def mem(width, rank):
        sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
        return S.peak_memory(fn, sd(8, width), sd(width, rank), sd(rank, width))

    by_rank = [mem(32, r) for r in (2, 4, 8)]
    by_width = [mem(w, 4) for w in (16, 32, 64)]
    assert by_rank == sorted(by_rank) and len(set(by_rank)) == 3
    assert by_width == sorted(by_width) and len(set(by_width)) == 3


def test_peak_memory_backend_without_analysis(monkeypatch):
    class Compiled:
        def memory_analysis(self):
            return None

    class Lowered:
        def compile(self):
            return Compiled()

    monkeypatch.setattr(S.jax, "jit", lambda fn: type("J", (), {"lower": lambda self, *a: Lowered()})())
    with pytest.raises(RuntimeError, match="memory analysis"):
        S.peak_memory(lambda x: x, jnp.ones(2))


def test_peak_memory_bad_fn():
    with pytest.raises(TypeError, match="fn"):
        S.peak_memory("not a function", jnp.ones(2))


# --------------------------------------------------------------------------- evolution
SPACE = {"a": (0, 1, 2, 3), "b": (0, 1, 2, 3), "c": ("x", "y")}


def _fns(log):
    def score(spec):
        log.append(S.arch_hash(spec))
        return spec["a"] * 2 + spec["b"] + (0.5 if spec["c"] == "y" else 0.0)

    def memory(spec):
        return 10 * spec["a"] + 3 * spec["b"] + (1 if spec["c"] == "y" else 0)

    return score, memory


def _run(budget=35, seed=0, **kw):
    log = []
    score, memory = _fns(log)
    kw = {"population": 8, "select": 3, "mutation": 3, "crossover": 3, "epochs": 4, **kw}
    return S.evolution_search(SPACE, score, memory, budget, seed=seed, structural=("a",), **kw), log


def test_search_deduplicates_and_finds_the_optimum():
    res, log = _run()
    # each distinct spec is scored at most once: calls = distinct hashes = legal records
    assert len(log) == len(set(log)) == res.evaluations
    hashes = [r["hash"] for r in res.history]
    assert len(hashes) == len(set(hashes)) == res.memory_evaluations
    assert res.evaluations == sum(r["score"] is not None for r in res.history)
    assert res.duplicates > 0  # 32 specs only: revisits happen and are skipped, not re-scored
    assert res.memory_evaluations <= 32
    # brute force over the whole space
    score, memory = _fns([])
    legal = [dict(zip(SPACE, v)) for v in itertools.product(*SPACE.values())]
    legal = [s for s in legal if memory(s) <= 35]
    best = max(score(s) for s in legal)
    assert res.best_score == best and memory(res.best) <= 35 and res.best_memory == memory(res.best)
    assert all(r["memory"] <= 35 for r in res.top)
    assert res.top_scores == sorted(res.top_scores)  # the top-1 never gets worse


def test_search_deterministic_for_a_seed():
    a, _ = _run(seed=3)
    b, _ = _run(seed=3)
    assert [r["hash"] for r in a.history] == [r["hash"] for r in b.history]
    assert a.best == b.best and a.evaluations == b.evaluations


def test_search_budget_no_candidate_meets():
    log = []
    score, memory = _fns(log)
    with pytest.raises(ValueError, match="budget=5.*smallest memory.* 10;"):
        S.evolution_search(SPACE, score, lambda s: memory(s) + 10, 5, population=4, select=2,
                           mutation=1, crossover=1, epochs=1)
    assert log == []  # refused before any score_fn call


@pytest.mark.parametrize("kw, exc, name", [
    ({"budget": 0}, ValueError, "budget"), ({"budget": True}, TypeError, "budget"),
    ({"budget": float("nan")}, ValueError, "budget"),
    ({"select": 9}, ValueError, "select"), ({"population": 0}, ValueError, "population"),
    ({"population": 2.0}, TypeError, "population"),
    ({"mutation": 5, "crossover": 5}, ValueError, "mutation"), ({"m_prob": 1.5}, ValueError, "m_prob"),
    ({"s_prob": -0.1}, ValueError, "s_prob"), ({"structural": ("z",)}, ValueError, "structural"),
    ({"structural": "a"}, TypeError, "structural"), ({"seed": 1.5}, TypeError, "seed"),
    ({"space": {}}, ValueError, "space"), ({"space": {"a": ()}}, ValueError, "space"),
    ({"space": {"a": 3}}, TypeError, "space"), ({"score_fn": None}, TypeError, "score_fn"),
    ({"memory_fn": 3}, TypeError, "memory_fn"),
])
def test_search_bad_input(kw, exc, name):
    score, memory = _fns([])
    args = {"space": SPACE, "score_fn": score, "memory_fn": memory, "budget": 35}
    opts = {"population": 8, "select": 3, "mutation": 3, "crossover": 3, "epochs": 1}
    for k in list(kw):
        (args if k in args else opts)[k] = kw[k]
    with pytest.raises(exc, match=name):
        S.evolution_search(args.pop("space"), args.pop("score_fn"), args.pop("memory_fn"), args.pop("budget"), **opts)


def test_search_nan_score_refused():
    with pytest.raises(ValueError, match="score_fn"):
        S.evolution_search(SPACE, lambda s: float("nan"), lambda s: 0.0, 1.0, population=2, select=1,
                           mutation=1, crossover=1, epochs=1)


@pytest.mark.parametrize("fn, bad, exc", [
    ("score_fn", "1", TypeError), ("score_fn", True, TypeError), ("score_fn", None, TypeError),
    ("memory_fn", "3", TypeError), ("memory_fn", -1.0, ValueError)])
def test_search_non_number_or_negative_memory_refused(fn, bad, exc):
    fns = {"score_fn": lambda s: 1.0, "memory_fn": lambda s: 0.0, fn: lambda s: bad}
    with pytest.raises(exc, match=f"{fn}.*candidate spec"):
        S.evolution_search(SPACE, fns["score_fn"], fns["memory_fn"], 1.0, population=2, select=1,
                           mutation=1, crossover=1, epochs=1)
    # real numbers of other kinds are fine, and come back as float
    res = S.evolution_search(SPACE, lambda s: np.float32(s["a"]), lambda s: jnp.asarray(1), 1.0, population=2,
                             select=1, mutation=1, crossover=1, epochs=1)
    assert type(res.best_score) is float and type(res.best_memory) is float
    assert res.duplicates == res.fill_duplicates + res.child_duplicates


def test_search_all_memory_inf_message():
    with pytest.raises(ValueError, match="memory_fn returned inf for every"):
        S.evolution_search(SPACE, lambda s: 1.0, lambda s: float("inf"), 5.0, population=2, select=1,
                           mutation=1, crossover=1, epochs=1)


def test_arch_hash_refuses_non_str_keys():
    with pytest.raises(TypeError, match="key.*1"):
        S.arch_hash({1: 2})
    with pytest.raises(TypeError, match="key"):
        S.arch_hash({"a": [{"b": 1, 2: 3}]})  # nested, mixed keys
    assert S.arch_hash({"1": 2}) != S.arch_hash({"2": 2})
