"""Neural architecture search utilities: candidate dedup by hash, the compiler's memory model, and an
evolutionary search under a memory budget.

* :func:`arch_hash` -- FSAP's whitespace-normalized MD5 of a spec (dict/list) or of source code
  (Vysyaraju et al., "Enhancing LLM-Based Neural Network Generation: Few-Shot Prompting and Efficient
  Validation", arXiv 2512.24120): ``C' = C`` with every ``' '``, ``'\\t'``, ``'\\n'``, ``'\\r'``
  removed, key ``= MD5(C')``.
* :func:`memory_analysis` / :func:`peak_memory` -- the bytes XLA's buffer assignment gives one
  compiled call, read from ``jax.jit(fn).lower(*args).compile().memory_analysis()``.
* :func:`evolution_search` -- the one-shot-NAS evolution of AutoFormer/MCUFormer (population, top-k
  selection, mutation with ``m_prob``/``s_prob``, crossover, epochs), each candidate first checked
  against a memory budget, candidates deduplicated by :func:`arch_hash` of their spec (each distinct
  spec is scored at most once). :class:`SearchResult` is what it returns.

Used by the MCUFormer supernet (:mod:`lrjax.nn.mcuformer`, ``experiments/mcuformer_digits.py``), but
nothing here knows about a particular model: a search space is a dict ``{key: choices}``, a candidate
spec is a dict ``{key: one choice}``, and the caller supplies ``score_fn(spec)`` and ``memory_fn(spec)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import numbers
import random
import tokenize
from typing import Any, Callable, Mapping

import jax
import numpy as np

from lrjax._validation import check_bool, check_float, check_int

__all__ = ["arch_hash", "memory_analysis", "peak_memory", "evolution_search", "SearchResult", "MEMORY_FIELDS"]

#: the ``CompiledMemoryStats`` fields :func:`peak_memory` adds (alias is subtracted)
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
_WHITESPACE = str.maketrans("", "", " \t\n\r")


# --------------------------------------------------------------------------- arch_hash (FSAP)
def _strip_comments(code: str) -> str:
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type != tokenize.COMMENT]
        return tokenize.untokenize(toks)
    except (tokenize.TokenError, IndentationError, SyntaxError) as e:
        raise ValueError(f"spec_or_code: strip_comments=True needs Python source that tokenizes ({e}); "
                         "pass strip_comments=False to hash the raw text") from None


def _check_spec_keys(obj, where):
    # json.dumps turns int keys into strings ({1: 2} would hash as {"1": 2}) and cannot sort mixed keys
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"spec_or_code: every dict key of a spec must be a str, got {k!r} "
                                f"({type(k).__name__}) in {where}; convert keys with str(k) yourself (json "
                                "would turn 1 into '1' silently, so {1: 2} and {'1': 2} would hash alike)")
            _check_spec_keys(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_spec_keys(v, f"{where}[{i}]")


def arch_hash(spec_or_code, *, strip_comments: bool = False) -> str:
    """FSAP whitespace-normalized MD5 of an architecture spec or of model source code.

    ``text`` is ``spec_or_code`` itself for a ``str`` (source code or any text), or, for a spec (a
    ``dict``/``list``/``tuple`` of JSON values, nested), ``json.dumps(spec, sort_keys=True)`` (so key
    order does not matter; tuples read as lists). Then FSAP's rule: ``C' = text`` with every
    ``' '``, ``'\\t'``, ``'\\n'`` and ``'\\r'`` removed, and the key is ``MD5(C')`` as 32 hex digits.

    ``strip_comments`` (default False; FSAP's paper removes whitespace only, some summaries add
    comment stripping, so it is an option): drop Python ``#`` comments first (via ``tokenize``; the
    text must tokenize as Python, else ``ValueError``). Only for a ``str``.

    Known collision class (by design of the rule, documented, tested): whitespace *inside string
    literals* is removed too, so ``"a b"`` and ``"ab"`` hash alike (``act="gelu new"`` ==
    ``act="gelunew"``), as do other texts that differ only in whitespace (``x = a if b else c`` vs
    ``x=aifbelsec``, ``return x`` vs ``returnx``). Numbers hash by their text: ``1`` and ``1.0`` differ,
    as do ``True`` and ``1`` in a spec. Cheap (one pass + MD5, microseconds for a spec).

    Raises ``TypeError`` for other kinds (bytes, numbers, None, a spec holding non-JSON values such as
    arrays), ``TypeError`` naming the key for a dict key that is not a ``str`` at any nesting level
    (JSON would turn ``1`` into ``"1"``, so ``{1: 2}`` and ``{"1": 2}`` would collide), ``TypeError`` for a non-bool ``strip_comments`` and ``ValueError`` for
    ``strip_comments=True`` on a spec or on text that does not tokenize.
    """
    strip_comments = check_bool(strip_comments, "strip_comments")
    if isinstance(spec_or_code, str):
        text = _strip_comments(spec_or_code) if strip_comments else spec_or_code
    elif isinstance(spec_or_code, (Mapping, list, tuple)):
        if strip_comments:
            raise ValueError("strip_comments: a spec (dict/list) has no comments; pass strip_comments=False "
                             "or pass source code as a str")
        _check_spec_keys(spec_or_code, "spec_or_code")
        try:
            text = json.dumps(spec_or_code, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"spec_or_code must hold JSON values only (str, int, float, bool, None, "
                            f"lists, dicts with str keys) ({e}); convert arrays with .tolist()") from None
    else:
        raise TypeError(f"spec_or_code must be a spec (dict/list of JSON values) or source code (str), got "
                        f"{type(spec_or_code).__name__}")
    return hashlib.md5(text.translate(_WHITESPACE).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- compiled memory model
def memory_analysis(fn: Callable, *args) -> dict:
    """XLA's memory numbers for one compiled call of ``fn(*args)``.

    Compiles ``jax.jit(fn).lower(*args).compile()`` for the default backend (``args`` may be
    arrays, pytrees of arrays, or ``jax.ShapeDtypeStruct`` placeholders: nothing runs) and returns
    the fields of its ``memory_analysis()`` (``CompiledMemoryStats``) as ints:
    ``argument_size_in_bytes`` (every input buffer: weights passed as arguments and the data),
    ``output_size_in_bytes``, ``temp_size_in_bytes`` (the temporaries after XLA's buffer assignment,
    which reuses a buffer once its value is dead, so this is the liveness-aware peak of the
    intermediates), ``alias_size_in_bytes`` (outputs that reuse donated inputs),
    ``generated_code_size_in_bytes``, the ``host_*`` counterparts, and ``peak_memory_in_bytes``
    where this jaxlib reports it; plus ``"peak"`` = :func:`peak_memory`'s number.

    These are the compiler's numbers for this backend (CPU here: XLA:CPU's buffer assignment, which
    can differ from a GPU's or a microcontroller runtime's), not a hand estimate.

    Raises ``TypeError`` if ``fn`` is not callable, and ``RuntimeError`` naming the backend if it
    returns no memory analysis (``None`` or ``NotImplementedError``; some plugins do), with the fix
    (run on CPU, ``JAX_PLATFORMS=cpu``, whose XLA reports it).
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable (the function whose compiled memory is measured), got "
                        f"{type(fn).__name__}")
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        stats = compiled.memory_analysis()
    except NotImplementedError:
        stats = None
    if stats is None:
        raise RuntimeError(f"peak_memory: backend {jax.default_backend()!r} returns no compiled memory analysis "
                           "(compile().memory_analysis() is None); measure on a backend whose XLA reports it, "
                           "e.g. run with JAX_PLATFORMS=cpu")
    names = [n for n in dir(stats) if n.endswith("_in_bytes")]
    out = {n: int(getattr(stats, n)) for n in names}
    missing = [f for f in MEMORY_FIELDS if f not in out]
    if missing:
        raise RuntimeError(f"peak_memory: backend {jax.default_backend()!r} memory analysis lacks {missing}; "
                           "measure on CPU (JAX_PLATFORMS=cpu)")
    out["peak"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] + out["temp_size_in_bytes"]
                   - out["alias_size_in_bytes"])
    return out


def peak_memory(fn: Callable, *args) -> int:
    """Peak bytes of one compiled call of ``fn(*args)`` as XLA's buffer assignment lays it out:
    ``argument_size_in_bytes + output_size_in_bytes + temp_size_in_bytes - alias_size_in_bytes``
    from ``jax.jit(fn).lower(*args).compile().memory_analysis()`` (the alias term is 0 unless inputs
    are donated). Weights passed as arguments count in ``argument_size_in_bytes``; close over them
    instead to leave them out (they become constants, which XLA does not count here). The
    compiler's number, not a hand estimate; see :func:`memory_analysis` for the fields and errors.
    """
    return memory_analysis(fn, *args)["peak"]


# --------------------------------------------------------------------------- evolutionary search
@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What :func:`evolution_search` returns.

    ``best``: the highest-scoring spec under the budget; ``best_score``, ``best_memory``: its score
    and memory as Python ``float`` (``float(score_fn(spec))``, ``float(memory_fn(spec))``; an int or a
    0-d NumPy/JAX array returned by the functions comes back as a float); ``top``: the final top-``select`` specs (best first) with their records;
    ``history``: one record per distinct spec met, in order, ``{"spec", "hash", "memory", "score"
    (None if over budget), "epoch"}``; ``evaluations``: calls of ``score_fn`` (= distinct specs under
    the budget); ``memory_evaluations``: calls of ``memory_fn`` (= distinct specs met);
    ``duplicates``: the number of *draws* skipped because their spec's hash was already met
    (``fill_duplicates + child_duplicates``); it counts draws, not distinct specs, so it can exceed
    the size of the space: once a small space is exhausted (or most of it is over budget) the random
    fill keeps drawing up to ``max_tries x population`` times per fill, and every such draw is a
    duplicate. ``fill_duplicates``: the random-fill draws (initial population and each epoch's
    top-up) that hit a seen spec -- retries, which cost one hash each and no function call;
    ``child_duplicates``: the mutation/crossover children that hit a seen spec. ``min_memory``: the
    smallest memory met; ``top_scores``: the best score after each epoch.
    """

    best: dict
    best_score: float
    best_memory: float
    top: list
    history: list
    evaluations: int
    memory_evaluations: int
    duplicates: int
    min_memory: float
    top_scores: list
    fill_duplicates: int = 0
    child_duplicates: int = 0


def _check_space(space) -> dict:
    if not isinstance(space, Mapping):
        raise TypeError(f"space must be a dict {{key: choices}}, got {type(space).__name__}")
    if not space:
        raise ValueError("space must name at least one key, e.g. {'embed': (32, 64)}")
    out = {}
    for k, v in space.items():
        if not isinstance(k, str):
            raise TypeError(f"space keys must be str, got {k!r} ({type(k).__name__})")
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
            raise TypeError(f"space[{k!r}] must be a list/tuple of choices, got {type(v).__name__}")
        if not v:
            raise ValueError(f"space[{k!r}] has no choices; give at least one")
        out[k] = tuple(v)
    return out


def evolution_search(space: Mapping[str, Any], score_fn: Callable[[dict], float],
                     memory_fn: Callable[[dict], float], budget: float, *, seed: int = 0,
                     population: int = 20, select: int = 5, mutation: int = 10, crossover: int = 10,
                     epochs: int = 5, m_prob: float = 0.2, s_prob: float = 0.4,
                     structural=(), max_tries: int = 50, progress: Callable | None = None) -> SearchResult:
    """Evolutionary architecture search under a memory budget (AutoFormer/MCUFormer ``evolution.py``).

    A candidate is a spec ``{key: choice}`` drawn from ``space`` (``{key: (choice, ...)}``). It is
    *legal* if its hash (:func:`arch_hash` of the spec) is new and ``memory_fn(spec) <= budget``;
    only legal candidates are scored (``score_fn(spec)``, higher is better). Every distinct spec is
    measured and scored at most once (dedup by hash), so revisits by mutation/crossover are free.

    Loop (the official one): fill a population of ``population`` legal random specs; then for each
    of ``epochs`` epochs: update the top-``select`` with the current population; make ``mutation``
    legal children, each from a random top spec, every key in ``structural`` re-drawn with
    probability ``s_prob`` (the official code: depth and embed dim) and every other key with
    probability ``m_prob`` (the official: per-layer mlp ratio and heads); make ``crossover`` legal
    children, each key taken from one of two random top specs with probability 1/2; fill up to
    ``population`` with legal random specs. A final top-k update follows the last epoch (the
    official code stops before it, so its last population is evaluated but never ranked).
    Mutation and crossover give up after ``10 x`` their count draws (official ``max_iters``); the
    random fill after ``max_tries x population`` draws (the official loops forever, which a small,
    exhausted or over-budget space would hang).

    Defaults: the official ones scaled down 2.5x for CPU: population 50 -> 20, select 10 -> 5,
    mutation 25 -> 10, crossover 25 -> 10, epochs 20 -> 5; ``m_prob`` 0.2 and ``s_prob`` 0.4 as
    official. Deterministic for a ``seed`` (Python ``random.Random(seed)``), given deterministic
    ``score_fn``/``memory_fn``.

    ``progress``: optional ``callable(epoch, result_so_far_best_score)`` called after each epoch.

    Raises ``TypeError``/``ValueError`` naming the argument for a bad space, non-callable functions,
    a non-positive/NaN budget, bad counts (``select <= population``, ``mutation + crossover <=
    population``) or probabilities outside [0, 1], ``structural`` keys not in ``space``; and
    ``ValueError`` naming ``budget`` and the smallest memory met when no candidate meets the budget
    (before any ``score_fn`` call; when ``memory_fn`` returned ``inf`` for every candidate the message
    says so); ``TypeError`` naming ``score_fn``/``memory_fn`` and the candidate spec when one returns a
    non-number (a ``str`` such as ``'1'``, a ``bool``, ``None``, a non-scalar array: refused, not
    converted); ``ValueError`` naming it and the spec for NaN, or for a negative memory.
    """
    space = _check_space(space)
    for name, f in (("score_fn", score_fn), ("memory_fn", memory_fn)):
        if not callable(f):
            raise TypeError(f"{name} must be a callable taking a spec dict, got {type(f).__name__}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be None or a callable, got {type(progress).__name__}")
    budget = check_float(budget, "budget", low=0, low_open=True, allow_inf=True)
    seed = check_int(seed, "seed")
    population = check_int(population, "population", low=1)
    select = check_int(select, "select", low=1, high=population)
    mutation = check_int(mutation, "mutation", low=0)
    crossover = check_int(crossover, "crossover", low=0)
    if mutation + crossover > population:
        raise ValueError(f"mutation + crossover must be <= population ({population}), got {mutation} + {crossover}; "
                         "lower them or raise population")
    epochs = check_int(epochs, "epochs", low=0)
    m_prob = check_float(m_prob, "m_prob", low=0, high=1)
    s_prob = check_float(s_prob, "s_prob", low=0, high=1)
    max_tries = check_int(max_tries, "max_tries", low=1)
    if isinstance(structural, str) or not isinstance(structural, (list, tuple, set, frozenset)):
        raise TypeError(f"structural must be a list/tuple of space keys, got {type(structural).__name__}")
    for k in structural:
        if k not in space:
            raise ValueError(f"structural key {k!r} is not in space; use some of {sorted(space)}")
    structural = frozenset(structural)

    rng = random.Random(seed)
    keys = list(space)
    records: dict[str, dict] = {}
    history: list[dict] = []
    counters = {"evaluations": 0, "memory": 0, "fill": 0, "child": 0, "epoch": 0}

    def number(v, name, spec):
        # a real number: int/float (not bool), a NumPy scalar or a 0-d real array (NumPy or JAX);
        # strings, bools and other kinds are refused, not converted
        kind = getattr(v, "dtype", None)
        ok = (isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))) if kind is None else (
            getattr(v, "shape", None) == () and (np.issubdtype(kind, np.floating) or np.issubdtype(kind, np.integer)))
        if not ok:
            raise TypeError(f"{name} returned {v!r} ({type(v).__name__}) for the candidate spec {spec}; it must "
                            "return a real number (int, float or a 0-d float array), not a str, bool or array")
        v = float(v)
        if math.isnan(v):
            raise ValueError(f"{name} returned NaN for the candidate spec {spec}; it must return a real number")
        return v

    def legal(spec, source) -> bool:
        h = arch_hash(spec)
        if h in records:
            counters[source] += 1
            return False
        mem = number(memory_fn(dict(spec)), "memory_fn", spec)
        if mem < 0:
            raise ValueError(f"memory_fn returned {mem:g} for the candidate spec {spec}; a memory must be >= 0 "
                             "(bytes or another non-negative size); fix memory_fn")
        counters["memory"] += 1
        rec = {"spec": dict(spec), "hash": h, "memory": mem, "score": None, "epoch": counters["epoch"]}
        records[h] = rec
        history.append(rec)
        if mem > budget:
            return False
        rec["score"] = number(score_fn(dict(spec)), "score_fn", spec)
        counters["evaluations"] += 1
        return True

    def random_spec():
        return {k: rng.choice(space[k]) for k in keys}

    def fill(cands, target):
        tries = max_tries * population
        while len(cands) < target and tries > 0:
            tries -= 1
            s = random_spec()
            if legal(s, "fill"):
                cands.append(s)
        return cands

    def min_memory():
        return min(r["memory"] for r in history) if history else math.inf

    candidates = fill([], population)
    if not any(r["score"] is not None for r in history) and history and all(
            math.isinf(r["memory"]) for r in history):
        raise ValueError(f"budget={budget:g} is met by no candidate: memory_fn returned inf for every one of the "
                         f"{len(history)} distinct specs sampled; check memory_fn (inf marks a spec that cannot "
                         "run) or add choices it can measure to the space")
    if not any(r["score"] is not None for r in history):
        raise ValueError(f"budget={budget:g} is met by no candidate: the smallest memory among the "
                         f"{len(history)} distinct specs sampled is {min_memory():g}; raise `budget` to at "
                         f"least {min_memory():g} or add smaller choices to the space")

    top: list[dict] = []
    top_scores: list[float] = []

    def update_top(cands):
        nonlocal top
        seen = {arch_hash(s) for s in top}
        merged = top + [s for s in cands if arch_hash(s) not in seen]
        merged.sort(key=lambda s: records[arch_hash(s)]["score"], reverse=True)  # stable: ties keep order
        top = merged[:select]

    def child(make, count):
        out, tries = [], 10 * count
        while len(out) < count and tries > 0:
            tries -= 1
            s = make()
            if legal(s, "child"):
                out.append(s)
        return out

    def mutate():
        s = dict(rng.choice(top))
        for k in keys:
            p = s_prob if k in structural else m_prob
            if rng.random() < p:
                s[k] = rng.choice(space[k])
        return s

    def cross():
        a, b = rng.choice(top), rng.choice(top)
        return {k: (a[k] if rng.random() < 0.5 else b[k]) for k in keys}

    for epoch in range(epochs):
        counters["epoch"] = epoch + 1
        update_top(candidates)
        top_scores.append(records[arch_hash(top[0])]["score"])
        candidates = child(mutate, mutation) + child(cross, crossover)
        candidates = fill(candidates, population)
        if progress is not None:
            progress(epoch, top_scores[-1])
    update_top(candidates)
    top_scores.append(records[arch_hash(top[0])]["score"])
    best = records[arch_hash(top[0])]
    return SearchResult(best=dict(best["spec"]), best_score=best["score"], best_memory=best["memory"],
                        top=[dict(records[arch_hash(s)]) for s in top], history=history,
                        evaluations=counters["evaluations"], memory_evaluations=counters["memory"],
                        duplicates=counters["fill"] + counters["child"], min_memory=min_memory(),
                        top_scores=top_scores, fill_duplicates=counters["fill"], child_duplicates=counters["child"])
