"""Deterministic synthetic long-context tasks: passkey (S-NIAH), MQAR and BABILong-style qa1/qa2.

Why synthetic: they need no download, run on any tokenizer, and let us place the information
exactly where we want it (depth, distance), so a memory layer's reach can be measured directly.

Conventions shared by every generator:

* ``length`` is the length of the *whole scored sequence*:
  ``len(example.input_ids) + len(example.target_ids) == example.length`` exactly. Filler text
  absorbs the slack, so examples of one cell stack into a batch without padding.
* Sequences are built in token space by concatenating independently encoded segments (filler
  sentences, needle, facts, question, answer). This is what makes lengths exact for any
  tokenizer; ``prompt_text``/``target_text`` are ``decode`` of the ids, never re-encoded.
* The filler is a stream of grammatical sentences drawn from word lists defined in this file.
  To hit an exact token count the stream is cut *at its start* (the haystack begins
  mid-sentence, like an excerpt of a longer document); needles and facts are inserted only at
  sentence boundaries, so the realised depth can differ from the requested one by at most one
  sentence (recorded as ``metadata["actual_depth"]``).
* Every example draws from its own RNG, derived by SHA-256 from (task, seed, cell, index), so an
  example does not change when the rest of the grid changes, and training streams (salted with
  ``"train"``) never reproduce evaluation examples.
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import asdict, dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

import torch
from olmo_core.config import Config

from olmo_miras_plugin.tokenizer import ByteTokenizer

__all__ = [
    "IGNORE_INDEX",
    "TokenizerLike",
    "EvalExample",
    "TrainingSequence",
    "MQARTokenSpec",
    "PasskeyTaskConfig",
    "MQARTaskConfig",
    "BabilongTaskConfig",
    "make_passkey_example",
    "passkey_examples",
    "make_mqar_example",
    "mqar_examples",
    "make_mqar_token_example",
    "mqar_token_examples",
    "make_babilong_example",
    "babilong_examples",
    "example_to_training_sequence",
    "collate_training_sequences",
    "passkey_training_stream",
    "mqar_training_stream",
    "mqar_token_training_stream",
    "filler_words",
    "BABI_NAMES",
    "BABI_LOCATIONS",
    "BABI_OBJECTS",
]

IGNORE_INDEX: int = -100
"""OLMo-core's ``label_ignore_index``: label positions with this value carry no loss."""


class TokenizerLike(Protocol):
    """Anything with ``encode(text) -> list[int]`` and ``decode(ids) -> str``."""

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: List[int]) -> str: ...


# ---------------------------------------------------------------------------------------------
# Example containers
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalExample:
    """One scored sequence: ``input_ids`` (prompt) followed by ``target_ids`` (continuation).

    Only the tokens inside ``answer_spans`` (half-open ranges into ``target_ids``, one per
    question) are scored; MQAR keeps later query keys and separators in the target unscored so
    that all queries of one context are scored in a single teacher-forced pass.
    """

    task: str
    length: int
    input_ids: List[int]
    target_ids: List[int]
    answer_spans: List[Tuple[int, int]]
    answers: List[str]
    prompt_text: str
    target_text: str
    seed: int
    index: int
    """Index of the example inside its grid cell (task, length, depth/distance, n_pairs)."""
    depth: Optional[float] = None
    distance: Optional[int] = None
    n_pairs: Optional[int] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    """Task-specific details: needle/fact/pair token positions, realised depths, the key, ..."""

    @property
    def full_ids(self) -> List[int]:
        """Prompt followed by target: what a teacher-forced scorer feeds the model."""
        return self.input_ids + self.target_ids

    def answer_positions(self) -> List[List[int]]:
        """Absolute positions (into :attr:`full_ids`) of each answer's tokens."""
        p = len(self.input_ids)
        return [list(range(p + s, p + e)) for s, e in self.answer_spans]

    def answer_token_ids(self) -> List[List[int]]:
        """Token ids of each answer span."""
        return [self.target_ids[s:e] for s, e in self.answer_spans]

    def cell(self) -> Tuple[str, int, Optional[float], Optional[int], Optional[int]]:
        """Aggregation key: (task, length, depth, distance, n_pairs)."""
        return (self.task, self.length, self.depth, self.distance, self.n_pairs)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable view."""
        d = asdict(self)
        d["answer_spans"] = [list(s) for s in self.answer_spans]
        return d


@dataclass
class TrainingSequence:
    """A fixed-length training sequence in OLMo-core's batch convention.

    * ``label_mask[t]`` is True when token ``input_ids[t]`` should be predicted (the
      pre-shift mask that :func:`olmo_core.data.utils.get_labels` consumes);
    * ``labels`` is already shifted: ``labels[t] = input_ids[t + 1]`` where ``label_mask[t + 1]``
      and :data:`IGNORE_INDEX` (-100) elsewhere, i.e. exactly ``get_labels`` of the two above.
    """

    input_ids: torch.Tensor
    label_mask: torch.Tensor
    labels: torch.Tensor

    def as_batch_dict(self) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "label_mask": self.label_mask, "labels": self.labels}


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _rng(*parts: Any) -> random.Random:
    """An RNG seeded from a stable hash of ``parts`` (independent of ``PYTHONHASHSEED``)."""
    key = "\x1f".join(repr(p) for p in parts).encode("utf-8")
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


class _Encoder:
    """Caches ``tokenizer.encode`` and never adds special tokens (BOS/EOS) to segments."""

    _MAX_CACHE = 200_000

    def __init__(self, tokenizer: Optional[TokenizerLike]):
        self.tokenizer: TokenizerLike = tokenizer if tokenizer is not None else ByteTokenizer()
        self._cache: Dict[str, List[int]] = {}

    def __call__(self, text: str) -> List[int]:
        ids = self._cache.get(text)
        if ids is None:
            try:
                raw = self.tokenizer.encode(text, add_special_tokens=False)  # type: ignore
            except TypeError:
                raw = self.tokenizer.encode(text)
            ids = [int(i) for i in raw]
            if len(self._cache) >= self._MAX_CACHE:
                self._cache.clear()
            self._cache[text] = ids
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _check_depth(depth: Any) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not (0.0 <= depth <= 1.0):
        raise ValueError(f"depth={depth!r} must be a number in [0, 1]")
    return float(depth)


def _too_short(task: str, length: int, needed: int, what: str) -> ValueError:
    return ValueError(
        f"length={length} is too short for {task}: {what} alone take {needed} tokens "
        f"(need length >= {needed})"
    )


# Filler vocabulary: no digits, no names, no bAbI locations/objects, no '=', ';' or '?', so the
# needle, facts, pairs and questions are the only such content in a prompt.
_ADJ = (
    "quiet old small bright distant gentle heavy narrow silver golden pale wide dusty ancient "
    "empty warm cold tall slow hidden broken curious green blue grey soft calm wild simple steady"
).split()
_NOUN = (
    "river mountain lantern forest meadow bridge village harbor window candle valley cloud stone "
    "feather tower road lake field orchard island market library wagon chimney fence ship mill "
    "hill storm shadow path wall clock bell rope basket ladder pond cliff"
).split()
_PLURAL = (
    "birds leaves waves clouds stars lanterns bells horses travelers sailors farmers children "
    "shadows candles rivers"
).split()
_VERB = (
    "rests waits stands leans drifts glows sways turns hums fades shines sleeps lingers settles"
).split()
_VERB_PL = "rest wait gather drift glow sway wander linger settle".split()
_PREP = ("near", "beside", "behind", "above", "below", "beyond", "under", "across from", "along")
_ADV = "slowly quietly softly gently calmly patiently silently steadily".split()
_TIME = "morning evening night spring autumn winter summer day".split()
_TEMPLATES = (
    "The {a} {n} {v} {p} the {n2}.",
    "A {a} {n} {v} {adv}.",
    "Every {t}, the {n} {v} {p} the {a2} {n2}.",
    "The {n} was {a} and {a2}.",
    "Nobody knew why the {n} {v} {adv} {p} the {n2}.",
    "In the {t}, the {a} {n} {v}.",
    "{P} {vp} {p} the {a} {n}.",
    "{P} {vp} {adv} when the {n} is {a}.",
)


def _sentence(rng: random.Random) -> str:
    template = rng.choice(_TEMPLATES)
    return template.format(
        a=rng.choice(_ADJ),
        a2=rng.choice(_ADJ),
        n=rng.choice(_NOUN),
        n2=rng.choice(_NOUN),
        v=rng.choice(_VERB),
        vp=rng.choice(_VERB_PL),
        p=rng.choice(_PREP),
        adv=rng.choice(_ADV),
        t=rng.choice(_TIME),
        P=rng.choice(_PLURAL).capitalize(),
    )


def filler_words() -> frozenset:
    """Every word the filler grammar can emit (lower-cased); used to keep keys/entities apart."""
    words = set(_ADJ + _NOUN + _PLURAL + _VERB + _VERB_PL + _ADV + _TIME)
    for p in _PREP:
        words.update(p.split())
    for t in _TEMPLATES:
        for w in t.replace(",", " ").replace(".", " ").split():
            if not w.startswith("{"):
                words.add(w.lower())
    return frozenset(words)


def _filler(rng: random.Random, enc: _Encoder, n_tokens: int) -> Tuple[List[int], List[int]]:
    """Exactly ``n_tokens`` filler ids plus the offsets of sentence boundaries inside them.

    Whole sentences are encoded (each with a leading space) until the budget is covered; the
    surplus is cut from the *start*, so every boundary after the first fragment is clean.
    """
    if n_tokens < 0:
        raise ValueError(f"filler length {n_tokens} must be >= 0")
    if n_tokens == 0:
        return [], [0]
    pieces: List[List[int]] = []
    total = 0
    while total < n_tokens:
        ids = enc(" " + _sentence(rng))
        if not ids:
            raise ValueError("tokenizer encoded a filler sentence to zero tokens")
        pieces.append(ids)
        total += len(ids)
    excess = total - n_tokens
    flat = [t for p in pieces for t in p][excess:]
    bounds = [0] if excess == 0 else []
    c = -excess
    for p in pieces:
        c += len(p)
        if c >= 0 and (not bounds or c != bounds[-1]):
            bounds.append(c)
    return flat, bounds


def _nearest(bounds: Sequence[int], target: float) -> int:
    return min(bounds, key=lambda b: (abs(b - target), b))


def _splice(
    filler: List[int], items: Sequence[Tuple[int, List[int]]]
) -> Tuple[List[int], List[int]]:
    """Insert ``items`` (filler offset, ids), sorted by offset; return ids + start positions."""
    out: List[int] = []
    starts: List[int] = []
    prev = 0
    for pos, ids in items:
        out.extend(filler[prev:pos])
        starts.append(len(out))
        out.extend(ids)
        prev = pos
    out.extend(filler[prev:])
    return out, starts


def _finish(
    enc: Optional[_Encoder],
    *,
    task: str,
    length: int,
    input_ids: List[int],
    target_ids: List[int],
    answer_spans: List[Tuple[int, int]],
    answers: List[str],
    seed: int,
    index: int,
    depth: Optional[float] = None,
    distance: Optional[int] = None,
    n_pairs: Optional[int] = None,
    metadata: Optional[Dict[str, Any]] = None,
    render: Optional[Callable[[Sequence[int]], str]] = None,
) -> EvalExample:
    if len(input_ids) + len(target_ids) != length:  # internal invariant, not user input
        raise AssertionError(f"built {len(input_ids) + len(target_ids)} tokens instead of {length}")
    decode = render if render is not None else enc.decode  # type: ignore[union-attr]
    return EvalExample(
        task=task,
        length=length,
        input_ids=input_ids,
        target_ids=target_ids,
        answer_spans=answer_spans,
        answers=answers,
        prompt_text=decode(input_ids),
        target_text=decode(target_ids),
        seed=seed,
        index=index,
        depth=depth,
        distance=distance,
        n_pairs=n_pairs,
        metadata=metadata or {},
    )


def _as_list(x: Union[int, float, Sequence[Any]]) -> List[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ---------------------------------------------------------------------------------------------
# 1. Passkey / single needle (RULER S-NIAH style)
# ---------------------------------------------------------------------------------------------

PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def _build_passkey(
    enc: _Encoder,
    rng: random.Random,
    *,
    length: int,
    depth: float,
    key_digits: int,
    seed: int,
    index: int,
) -> EvalExample:
    key = str(rng.randint(10 ** (key_digits - 1), 10**key_digits - 1))
    needle = enc(PASSKEY_NEEDLE.format(key=key))
    question = enc(PASSKEY_QUESTION)
    target = enc(" " + key)
    fixed = len(needle) + len(question) + len(target)
    n_filler = length - fixed
    if n_filler < 0:
        raise _too_short("passkey", length, fixed, "the needle, question and answer")
    filler, bounds = _filler(rng, enc, n_filler)
    pos = _nearest(bounds, depth * n_filler)
    haystack, (needle_start,) = _splice(filler, [(pos, needle)])
    input_ids = haystack + question
    return _finish(
        enc,
        task="passkey",
        length=length,
        input_ids=input_ids,
        target_ids=target,
        answer_spans=[(0, len(target))],
        answers=[key],
        seed=seed,
        index=index,
        depth=depth,
        metadata={
            "key": key,
            "needle_start": needle_start,
            "needle_end": needle_start + len(needle),
            "needle_text": PASSKEY_NEEDLE.format(key=key),
            "filler_tokens": n_filler,
            "actual_depth": pos / n_filler if n_filler > 0 else depth,
        },
    )


def make_passkey_example(
    tokenizer: Optional[TokenizerLike] = None,
    length: int = 1024,
    depth: float = 0.5,
    seed: int = 0,
    index: int = 0,
    *,
    key_digits: int = 5,
) -> EvalExample:
    """One passkey example: a ``key_digits``-digit key hidden at ``depth`` of the haystack.

    ``depth`` 0 puts the needle at the start of the haystack, 1 right before the question.
    """
    _check_int("length", length, 1)
    depth = _check_depth(depth)
    _check_int("key_digits", key_digits, 1)
    rng = _rng("passkey", seed, length, depth, key_digits, index)
    return _build_passkey(
        _Encoder(tokenizer),
        rng,
        length=length,
        depth=depth,
        key_digits=key_digits,
        seed=seed,
        index=index,
    )


def passkey_examples(
    tokenizer: Optional[TokenizerLike] = None,
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    n_per_cell: int = 5,
    seed: int = 0,
    *,
    key_digits: int = 5,
) -> List[EvalExample]:
    """The lengths × depths grid, ``n_per_cell`` examples per cell, in grid order."""
    _check_int("n_per_cell", n_per_cell, 1)
    _check_int("key_digits", key_digits, 1)
    enc = _Encoder(tokenizer)
    out: List[EvalExample] = []
    for length in _as_list(lengths):
        _check_int("length", length, 1)
        for depth in _as_list(depths):
            depth = _check_depth(depth)
            for i in range(n_per_cell):
                rng = _rng("passkey", seed, length, depth, key_digits, i)
                out.append(
                    _build_passkey(
                        enc,
                        rng,
                        length=length,
                        depth=depth,
                        key_digits=key_digits,
                        seed=seed,
                        index=i,
                    )
                )
    return out


# ---------------------------------------------------------------------------------------------
# 2. Multi-query associative recall (Zoology-style MQAR)
# ---------------------------------------------------------------------------------------------
#
# Layout (text and token-id forms alike):
#   [lead filler][k1 v1 ; k2 v2 ; ... kn vn ;][gap filler: exactly `distance` tokens][queries]
# Queries repeat the pair format ("k v ;") for a random subset/order of keys; the prompt ends
# right after the first query key and each query's value is an answer span. ``distance`` is the
# gap between the pair block and the query block, hence a lower bound on every per-query
# distance (tokens between the end of a pair and the start of its query), which is recorded
# exactly in ``metadata["query_distances"]``.


@dataclass
class MQARTokenSpec(Config):
    """Disjoint token-id ranges (half-open) for the raw token-id MQAR form, as in Zoology."""

    vocab_size: int = 256
    noise_range: Tuple[int, int] = (0, 64)
    """Ids used for the lead/gap filler; disjoint from keys and values so it cannot distract."""
    key_range: Tuple[int, int] = (64, 160)
    value_range: Tuple[int, int] = (160, 256)

    def validate(self) -> None:
        _check_int("vocab_size", self.vocab_size, 2)
        ranges = {
            "noise_range": self.noise_range,
            "key_range": self.key_range,
            "value_range": self.value_range,
        }
        for name, (lo, hi) in ranges.items():
            if not (0 <= lo < hi <= self.vocab_size):
                raise ValueError(
                    f"{name}=({lo}, {hi}) must satisfy 0 <= lo < hi <= vocab_size={self.vocab_size}"
                )
        items = sorted(ranges.items(), key=lambda kv: kv[1][0])
        for (n1, r1), (n2, r2) in zip(items, items[1:]):
            if r1[1] > r2[0]:
                raise ValueError(
                    f"{n1}={tuple(r1)} overlaps {n2}={tuple(r2)}; the ranges must be disjoint"
                )

    @property
    def n_keys(self) -> int:
        return self.key_range[1] - self.key_range[0]

    @property
    def n_values(self) -> int:
        return self.value_range[1] - self.value_range[0]


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@functools.lru_cache(maxsize=1)
def _key_pool() -> Tuple[str, ...]:
    """All CVCV pseudo-words that are not filler or bAbI words, in a fixed shuffled order."""
    reserved = set(filler_words()) | {w.lower() for w in BABI_NAMES + BABI_LOCATIONS + BABI_OBJECTS}
    words = [
        c1 + v1 + c2 + v2
        for c1 in _CONSONANTS
        for v1 in _VOWELS
        for c2 in _CONSONANTS
        for v2 in _VOWELS
        if (c1 + v1 + c2 + v2) not in reserved
    ]
    random.Random(1234).shuffle(words)
    return tuple(words)


def _check_mqar(
    n_pairs: int, n_queries: Optional[int], distance: int, n_keys: int, keys_name: str
) -> int:
    _check_int("n_pairs", n_pairs, 1)
    _check_int("distance", distance, 0)
    if n_pairs > n_keys:
        raise ValueError(
            f"n_pairs={n_pairs} exceeds the {n_keys} distinct keys available ({keys_name})"
        )
    if n_queries is None:
        return n_pairs
    _check_int("n_queries", n_queries, 1)
    if n_queries > n_pairs:
        raise ValueError(f"n_queries={n_queries} exceeds n_pairs={n_pairs}")
    return n_queries


def _assemble_mqar(
    rng: random.Random,
    *,
    task: str,
    length: int,
    distance: int,
    keys: List[List[int]],
    values: List[List[int]],
    sep: List[int],
    n_queries: int,
    make_filler: Callable[[int], List[int]],
) -> Tuple[List[int], List[int], List[Tuple[int, int]], Dict[str, Any], List[int]]:
    n_pairs = len(keys)
    order = rng.sample(range(n_pairs), n_queries)
    pair_len = sum(len(k) + len(v) + len(sep) for k, v in zip(keys, values))
    query_len = sum(len(keys[i]) + len(values[i]) + len(sep) for i in order)
    fixed = pair_len + distance + query_len
    n_lead = length - fixed
    if n_lead < 0:
        raise _too_short(
            task,
            length,
            fixed,
            f"n_pairs={n_pairs} pairs, n_queries={n_queries} queries and distance={distance}",
        )
    seq = make_filler(n_lead)
    pair_start, pair_end = [], []
    for k, v in zip(keys, values):
        pair_start.append(len(seq))
        seq += k + v + sep
        pair_end.append(len(seq))
    gap_start = len(seq)
    seq += make_filler(distance)
    query_start, value_spans = [], []
    for i in order:
        query_start.append(len(seq))
        seq += keys[i]
        value_spans.append((len(seq), len(seq) + len(values[i])))
        seq += values[i] + sep
    split = value_spans[0][0]
    spans = [(s - split, e - split) for s, e in value_spans]
    meta = {
        "query_order": order,
        "pair_starts": pair_start,
        "pair_ends": pair_end,
        "gap_start": gap_start,
        "query_starts": query_start,
        "query_distances": [query_start[j] - pair_end[i] for j, i in enumerate(order)],
        "lead_tokens": n_lead,
    }
    return seq[:split], seq[split:], spans, meta, order


def _build_mqar_text(
    enc: _Encoder,
    rng: random.Random,
    *,
    length: int,
    n_pairs: int,
    distance: int,
    n_queries: int,
    key_vocab_size: int,
    value_vocab_size: int,
    seed: int,
    index: int,
) -> EvalExample:
    pool = _key_pool()[:key_vocab_size]
    key_words = rng.sample(pool, n_pairs)
    width = len(str(value_vocab_size - 1))
    value_strs = [f"{rng.randrange(value_vocab_size):0{width}d}" for _ in range(n_pairs)]
    # Key, value and separator are encoded separately so the value's ids are identical in the
    # pair and in the answer whatever the tokenizer's merges.
    keys = [enc(f" {w}=") for w in key_words]
    values = [enc(v) for v in value_strs]
    sep = enc(";")
    input_ids, target_ids, spans, meta, order = _assemble_mqar(
        rng,
        task="mqar",
        length=length,
        distance=distance,
        keys=keys,
        values=values,
        sep=sep,
        n_queries=n_queries,
        make_filler=lambda n: _filler(rng, enc, n)[0],
    )
    meta.update({"keys": key_words, "values": value_strs, "n_queries": n_queries})
    return _finish(
        enc,
        task="mqar",
        length=length,
        input_ids=input_ids,
        target_ids=target_ids,
        answer_spans=spans,
        answers=[value_strs[i] for i in order],
        seed=seed,
        index=index,
        distance=distance,
        n_pairs=n_pairs,
        metadata=meta,
    )


def _check_text_vocab(key_vocab_size: int, value_vocab_size: int) -> None:
    _check_int("key_vocab_size", key_vocab_size, 1)
    _check_int("value_vocab_size", value_vocab_size, 2)
    if key_vocab_size > len(_key_pool()):
        raise ValueError(
            f"key_vocab_size={key_vocab_size} exceeds the {len(_key_pool())} available key words"
        )


def make_mqar_example(
    tokenizer: Optional[TokenizerLike] = None,
    length: int = 1024,
    n_pairs: int = 16,
    distance: int = 256,
    seed: int = 0,
    index: int = 0,
    *,
    n_queries: Optional[int] = None,
    key_vocab_size: int = 1024,
    value_vocab_size: int = 1000,
) -> EvalExample:
    """One text-form MQAR example: pairs like `` kobu=042;`` (pseudo-word key, numeric value).

    Keys are drawn without replacement from the first ``key_vocab_size`` pseudo-words, values
    with replacement from ``value_vocab_size`` zero-padded numbers.
    """
    _check_int("length", length, 1)
    _check_text_vocab(key_vocab_size, value_vocab_size)
    nq = _check_mqar(
        n_pairs, n_queries, distance, key_vocab_size, f"key_vocab_size={key_vocab_size}"
    )
    rng = _rng("mqar", seed, length, n_pairs, nq, distance, key_vocab_size, value_vocab_size, index)
    return _build_mqar_text(
        _Encoder(tokenizer),
        rng,
        length=length,
        n_pairs=n_pairs,
        distance=distance,
        n_queries=nq,
        key_vocab_size=key_vocab_size,
        value_vocab_size=value_vocab_size,
        seed=seed,
        index=index,
    )


def mqar_examples(
    tokenizer: Optional[TokenizerLike] = None,
    lengths: Sequence[int] = (1024, 2048, 4096),
    n_pairs: Union[int, Sequence[int]] = 16,
    distances: Sequence[int] = (64, 256, 512),
    n_per_cell: int = 5,
    seed: int = 0,
    *,
    n_queries: Optional[int] = None,
    key_vocab_size: int = 1024,
    value_vocab_size: int = 1000,
) -> List[EvalExample]:
    """The lengths × n_pairs × distances grid of text-form MQAR examples."""
    _check_int("n_per_cell", n_per_cell, 1)
    enc = _Encoder(tokenizer)
    out: List[EvalExample] = []
    for length in _as_list(lengths):
        for n in _as_list(n_pairs):
            for distance in _as_list(distances):
                for i in range(n_per_cell):
                    out.append(
                        _mqar_text_cell(
                            enc,
                            length,
                            n,
                            distance,
                            seed,
                            i,
                            n_queries,
                            key_vocab_size,
                            value_vocab_size,
                        )
                    )
    return out


def _mqar_text_cell(
    enc: _Encoder,
    length: int,
    n_pairs: int,
    distance: int,
    seed: int,
    index: int,
    n_queries: Optional[int],
    key_vocab_size: int,
    value_vocab_size: int,
    rng: Optional[random.Random] = None,
) -> EvalExample:
    _check_int("length", length, 1)
    _check_text_vocab(key_vocab_size, value_vocab_size)
    nq = _check_mqar(
        n_pairs, n_queries, distance, key_vocab_size, f"key_vocab_size={key_vocab_size}"
    )
    if rng is None:
        rng = _rng(
            "mqar", seed, length, n_pairs, nq, distance, key_vocab_size, value_vocab_size, index
        )
    return _build_mqar_text(
        enc,
        rng,
        length=length,
        n_pairs=n_pairs,
        distance=distance,
        n_queries=nq,
        key_vocab_size=key_vocab_size,
        value_vocab_size=value_vocab_size,
        seed=seed,
        index=index,
    )


def _render_ids(ids: Sequence[int]) -> str:
    return " ".join(str(int(i)) for i in ids)


def _build_mqar_tokens(
    rng: random.Random,
    *,
    length: int,
    n_pairs: int,
    distance: int,
    n_queries: int,
    spec: MQARTokenSpec,
    seed: int,
    index: int,
) -> EvalExample:
    key_ids = rng.sample(range(*spec.key_range), n_pairs)
    value_ids = [rng.randrange(*spec.value_range) for _ in range(n_pairs)]
    input_ids, target_ids, spans, meta, order = _assemble_mqar(
        rng,
        task="mqar_tokens",
        length=length,
        distance=distance,
        keys=[[k] for k in key_ids],
        values=[[v] for v in value_ids],
        sep=[],
        n_queries=n_queries,
        make_filler=lambda n: [rng.randrange(*spec.noise_range) for _ in range(n)],
    )
    meta.update({"keys": key_ids, "values": value_ids, "n_queries": n_queries})
    return _finish(
        None,
        task="mqar_tokens",
        length=length,
        input_ids=input_ids,
        target_ids=target_ids,
        answer_spans=spans,
        answers=[str(value_ids[i]) for i in order],
        seed=seed,
        index=index,
        distance=distance,
        n_pairs=n_pairs,
        metadata=meta,
        render=_render_ids,
    )


def _mqar_token_cell(
    length: int,
    n_pairs: int,
    distance: int,
    seed: int,
    index: int,
    n_queries: Optional[int],
    spec: MQARTokenSpec,
    rng: Optional[random.Random] = None,
) -> EvalExample:
    _check_int("length", length, 1)
    spec.validate()
    nq = _check_mqar(
        n_pairs, n_queries, distance, spec.n_keys, f"key_range={tuple(spec.key_range)}"
    )
    if rng is None:
        rng = _rng(
            "mqar_tokens",
            seed,
            length,
            n_pairs,
            nq,
            distance,
            tuple(spec.noise_range),
            tuple(spec.key_range),
            tuple(spec.value_range),
            index,
        )
    return _build_mqar_tokens(
        rng,
        length=length,
        n_pairs=n_pairs,
        distance=distance,
        n_queries=nq,
        spec=spec,
        seed=seed,
        index=index,
    )


def make_mqar_token_example(
    length: int = 512,
    n_pairs: int = 16,
    distance: int = 128,
    seed: int = 0,
    index: int = 0,
    *,
    n_queries: Optional[int] = None,
    spec: Optional[MQARTokenSpec] = None,
) -> EvalExample:
    """One raw token-id MQAR example (one token per key/value, no separators, noise filler).

    ``prompt_text``/``target_text`` are the ids written out as decimal numbers.
    """
    return _mqar_token_cell(
        length, n_pairs, distance, seed, index, n_queries, spec or MQARTokenSpec()
    )


def mqar_token_examples(
    lengths: Sequence[int] = (256, 512, 1024),
    n_pairs: Union[int, Sequence[int]] = 16,
    distances: Sequence[int] = (32, 128, 256),
    n_per_cell: int = 5,
    seed: int = 0,
    *,
    n_queries: Optional[int] = None,
    spec: Optional[MQARTokenSpec] = None,
) -> List[EvalExample]:
    """The lengths × n_pairs × distances grid of raw token-id MQAR examples."""
    _check_int("n_per_cell", n_per_cell, 1)
    spec = spec or MQARTokenSpec()
    out: List[EvalExample] = []
    for length in _as_list(lengths):
        for n in _as_list(n_pairs):
            for distance in _as_list(distances):
                for i in range(n_per_cell):
                    out.append(_mqar_token_cell(length, n, distance, seed, i, n_queries, spec))
    return out


# ---------------------------------------------------------------------------------------------
# 3. BABILong-style qa1 / qa2 in noise
# ---------------------------------------------------------------------------------------------

BABI_NAMES: List[str] = ["Mary", "John", "Sandra", "Daniel"]
BABI_LOCATIONS: List[str] = ["kitchen", "garden", "hallway", "bathroom", "bedroom", "office"]
BABI_OBJECTS: List[str] = ["apple", "football", "milk"]
_MOVE_VERBS = ("went to", "moved to", "journeyed to", "travelled to", "went back to")
_TAKE_VERBS = ("picked up", "grabbed", "got", "took")
_DROP_VERBS = ("dropped", "put down", "discarded")
_BABI_TASKS = ("qa1", "qa2")


def _story_qa1(rng: random.Random, n_facts: int) -> Tuple[List[str], str, str, str, List[int]]:
    """Moves only; ask where a person who moved is (single supporting fact)."""
    loc: Dict[str, str] = {}
    last: Dict[str, int] = {}
    facts: List[str] = []
    for i in range(n_facts):
        person = rng.choice(BABI_NAMES)
        place = rng.choice([p for p in BABI_LOCATIONS if p != loc.get(person)])
        facts.append(f"{person} {rng.choice(_MOVE_VERBS)} the {place}.")
        loc[person], last[person] = place, i
    who = rng.choice([p for p in BABI_NAMES if p in loc])
    question = f"\nQuestion: Where is {who}?\nAnswer: {who} is in the"
    return facts, question, loc[who], who, [last[who]]


def _story_qa2(rng: random.Random, n_facts: int) -> Tuple[List[str], str, str, str, List[int]]:
    """Moves, pick-ups and drops; ask where an object is (two supporting facts)."""
    for _ in range(1000):
        loc: Dict[str, str] = {}
        last_move: Dict[str, int] = {}
        holder: Dict[str, Optional[str]] = {o: None for o in BABI_OBJECTS}
        dropped_at: Dict[str, Optional[str]] = {o: None for o in BABI_OBJECTS}
        support: Dict[str, List[int]] = {}
        facts: List[str] = []
        for i in range(n_facts):
            takes = [
                (p, o)
                for p in BABI_NAMES
                if p in loc
                for o in BABI_OBJECTS
                if holder[o] is None and dropped_at[o] in (None, loc[p])
            ]
            drops = [(holder[o], o) for o in BABI_OBJECTS if holder[o] is not None]
            kinds = ["move"] + (["take"] if takes else []) + (["drop"] if drops else [])
            weights = {"move": 0.5, "take": 0.3, "drop": 0.2}
            kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
            if kind == "move":
                person = rng.choice(BABI_NAMES)
                place = rng.choice([p for p in BABI_LOCATIONS if p != loc.get(person)])
                facts.append(f"{person} {rng.choice(_MOVE_VERBS)} the {place}.")
                loc[person], last_move[person] = place, i
            elif kind == "take":
                person, obj = rng.choice(takes)
                facts.append(f"{person} {rng.choice(_TAKE_VERBS)} the {obj}.")
                holder[obj], dropped_at[obj] = person, None
                support[obj] = [i]
            else:
                person, obj = rng.choice(drops)  # type: ignore[assignment]
                facts.append(f"{person} {rng.choice(_DROP_VERBS)} the {obj}.")
                holder[obj], dropped_at[obj] = None, loc[person]
                support[obj] = [last_move[person], i]
        answerable = [o for o in BABI_OBJECTS if o in support]
        if answerable:
            obj = rng.choice(answerable)
            h = holder[obj]
            if h is not None:
                answer = loc[h]
                supporting = sorted({support[obj][0], last_move[h]})
            else:
                answer = dropped_at[obj]  # type: ignore[assignment]
                supporting = support[obj]
            question = f"\nQuestion: Where is the {obj}?\nAnswer: The {obj} is in the"
            return facts, question, answer, obj, supporting
    raise RuntimeError(f"could not generate an answerable qa2 story with n_facts={n_facts}")


def _build_babilong(
    enc: _Encoder,
    rng: random.Random,
    *,
    task: str,
    length: int,
    n_facts: int,
    seed: int,
    index: int,
) -> EvalExample:
    story = _story_qa1 if task == "qa1" else _story_qa2
    facts, question_text, answer, subject, supporting = story(rng, n_facts)
    fact_ids = [enc(" " + f) for f in facts]
    question = enc(question_text)
    target = enc(" " + answer)
    fixed = sum(len(f) for f in fact_ids) + len(question) + len(target)
    n_filler = length - fixed
    if n_filler < 0:
        raise _too_short(
            f"babilong_{task}", length, fixed, f"the {n_facts} facts, question and answer"
        )
    filler, bounds = _filler(rng, enc, n_filler)
    positions = sorted(rng.choice(bounds) for _ in fact_ids)
    haystack, starts = _splice(filler, list(zip(positions, fact_ids)))
    return _finish(
        enc,
        task=f"babilong_{task}",
        length=length,
        input_ids=haystack + question,
        target_ids=target,
        answer_spans=[(0, len(target))],
        answers=[answer],
        seed=seed,
        index=index,
        metadata={
            "facts": facts,
            "fact_starts": starts,
            "fact_depths": [p / n_filler if n_filler else 0.0 for p in positions],
            "supporting_facts": supporting,
            "subject": subject,
            "question": question_text.strip(),
            "n_facts": n_facts,
            "filler_tokens": n_filler,
        },
    )


def _check_babi(task: str, n_facts: Optional[int]) -> int:
    if task not in _BABI_TASKS:
        raise ValueError(f"task={task!r} must be one of {_BABI_TASKS}")
    if n_facts is None:
        return 4 if task == "qa1" else 6
    return _check_int("n_facts", n_facts, 1 if task == "qa1" else 2)


def make_babilong_example(
    tokenizer: Optional[TokenizerLike] = None,
    task: str = "qa1",
    length: int = 1024,
    seed: int = 0,
    index: int = 0,
    *,
    n_facts: Optional[int] = None,
) -> EvalExample:
    """One BABILong-style example: a bAbI ``qa1``/``qa2`` story scattered through filler.

    ``n_facts`` (default 4 for qa1, 6 for qa2) counts all story sentences, distractors included.
    """
    nf = _check_babi(task, n_facts)
    _check_int("length", length, 1)
    rng = _rng("babilong", task, seed, length, nf, index)
    return _build_babilong(
        _Encoder(tokenizer), rng, task=task, length=length, n_facts=nf, seed=seed, index=index
    )


def babilong_examples(
    tokenizer: Optional[TokenizerLike] = None,
    task: str = "qa1",
    lengths: Sequence[int] = (1024, 2048, 4096),
    n_per_cell: int = 10,
    seed: int = 0,
    *,
    n_facts: Optional[int] = None,
) -> List[EvalExample]:
    """``n_per_cell`` examples of ``task`` at each length."""
    _check_int("n_per_cell", n_per_cell, 1)
    nf = _check_babi(task, n_facts)
    enc = _Encoder(tokenizer)
    out: List[EvalExample] = []
    for length in _as_list(lengths):
        _check_int("length", length, 1)
        for i in range(n_per_cell):
            rng = _rng("babilong", task, seed, length, nf, i)
            out.append(
                _build_babilong(enc, rng, task=task, length=length, n_facts=nf, seed=seed, index=i)
            )
    return out


# ---------------------------------------------------------------------------------------------
# Config dataclasses (OLMo-core style)
# ---------------------------------------------------------------------------------------------


@dataclass
class PasskeyTaskConfig(Config):
    lengths: Tuple[int, ...] = (1024, 2048, 4096)
    depths: Tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    n_per_cell: int = 5
    seed: int = 0
    key_digits: int = 5

    def build(self, tokenizer: Optional[TokenizerLike] = None) -> List[EvalExample]:
        return passkey_examples(
            tokenizer,
            self.lengths,
            self.depths,
            self.n_per_cell,
            self.seed,
            key_digits=self.key_digits,
        )


@dataclass
class MQARTaskConfig(Config):
    """Text-form MQAR grid, or the raw token-id form when ``token_form`` (tokenizer unused)."""

    lengths: Tuple[int, ...] = (1024, 2048, 4096)
    n_pairs: Tuple[int, ...] = (16,)
    distances: Tuple[int, ...] = (64, 256, 512)
    n_per_cell: int = 5
    seed: int = 0
    n_queries: Optional[int] = None
    key_vocab_size: int = 1024
    value_vocab_size: int = 1000
    token_form: bool = False
    spec: MQARTokenSpec = field(default_factory=MQARTokenSpec)

    def build(self, tokenizer: Optional[TokenizerLike] = None) -> List[EvalExample]:
        if self.token_form:
            return mqar_token_examples(
                self.lengths,
                self.n_pairs,
                self.distances,
                self.n_per_cell,
                self.seed,
                n_queries=self.n_queries,
                spec=self.spec,
            )
        return mqar_examples(
            tokenizer,
            self.lengths,
            self.n_pairs,
            self.distances,
            self.n_per_cell,
            self.seed,
            n_queries=self.n_queries,
            key_vocab_size=self.key_vocab_size,
            value_vocab_size=self.value_vocab_size,
        )


@dataclass
class BabilongTaskConfig(Config):
    task: str = "qa1"
    lengths: Tuple[int, ...] = (1024, 2048, 4096)
    n_per_cell: int = 10
    seed: int = 0
    n_facts: Optional[int] = None

    def build(self, tokenizer: Optional[TokenizerLike] = None) -> List[EvalExample]:
        return babilong_examples(
            tokenizer, self.task, self.lengths, self.n_per_cell, self.seed, n_facts=self.n_facts
        )


# ---------------------------------------------------------------------------------------------
# Training-data streams for the tiny experiment
# ---------------------------------------------------------------------------------------------


def example_to_training_sequence(
    example: EvalExample, answer_only: bool = True
) -> TrainingSequence:
    """An example as a training sequence; loss only on answers unless ``answer_only=False``."""
    ids = torch.tensor(example.full_ids, dtype=torch.long)
    if answer_only:
        mask = torch.zeros(len(ids), dtype=torch.bool)
        for positions in example.answer_positions():
            mask[positions] = True
    else:
        mask = torch.ones(len(ids), dtype=torch.bool)
        mask[0] = False  # the first token is never predicted
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:-1] = torch.where(mask[1:], ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
    return TrainingSequence(input_ids=ids, label_mask=mask, labels=labels)


def collate_training_sequences(seqs: Sequence[TrainingSequence]) -> Dict[str, torch.Tensor]:
    """Stack equal-length sequences into an OLMo-core style batch dict."""
    if not seqs:
        raise ValueError("seqs must not be empty")
    lengths = {int(s.input_ids.numel()) for s in seqs}
    if len(lengths) != 1:
        raise ValueError(f"all sequences must have the same length, got lengths {sorted(lengths)}")
    return {
        "input_ids": torch.stack([s.input_ids for s in seqs]),
        "label_mask": torch.stack([s.label_mask for s in seqs]),
        "labels": torch.stack([s.labels for s in seqs]),
    }


def _draw(rng: random.Random, name: str, value: Union[int, Tuple[int, int]]) -> int:
    """An int, or an inclusive ``(lo, hi)`` range sampled per sequence."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] > value[1]:
            raise ValueError(
                f"{name}={value!r} must be an int or an inclusive (lo, hi) range with lo <= hi"
            )
        return rng.randint(int(value[0]), int(value[1]))
    return int(value)


def mqar_token_training_stream(
    seq_len: int,
    n_pairs: Union[int, Tuple[int, int]],
    distance: Union[int, Tuple[int, int]],
    *,
    n_queries: Optional[int] = None,
    spec: Optional[MQARTokenSpec] = None,
    seed: int = 0,
    answer_only: bool = True,
) -> Iterator[TrainingSequence]:
    """Endless raw token-id MQAR training sequences of exactly ``seq_len`` tokens.

    ``n_pairs``/``distance`` may be ranges; ``n_queries`` defaults to all pairs.
    """
    spec = spec or MQARTokenSpec()
    _check_int("seq_len", seq_len, 2)
    i = 0
    while True:
        rng = _rng("mqar_tokens", "train", seed, i)
        n = _draw(rng, "n_pairs", n_pairs)
        d = _draw(rng, "distance", distance)
        nq = None if n_queries is None else min(n_queries, n)
        ex = _mqar_token_cell(seq_len, n, d, seed, i, nq, spec, rng=rng)
        yield example_to_training_sequence(ex, answer_only=answer_only)
        i += 1


def mqar_training_stream(
    tokenizer: Optional[TokenizerLike],
    seq_len: int,
    n_pairs: Union[int, Tuple[int, int]],
    distance: Union[int, Tuple[int, int]],
    *,
    n_queries: Optional[int] = None,
    key_vocab_size: int = 1024,
    value_vocab_size: int = 1000,
    seed: int = 0,
    answer_only: bool = True,
) -> Iterator[TrainingSequence]:
    """Endless text-form MQAR training sequences of exactly ``seq_len`` tokens."""
    _check_int("seq_len", seq_len, 2)
    enc = _Encoder(tokenizer)
    i = 0
    while True:
        rng = _rng("mqar", "train", seed, i)
        n = _draw(rng, "n_pairs", n_pairs)
        d = _draw(rng, "distance", distance)
        nq = None if n_queries is None else min(n_queries, n)
        ex = _mqar_text_cell(
            enc, seq_len, n, d, seed, i, nq, key_vocab_size, value_vocab_size, rng=rng
        )
        yield example_to_training_sequence(ex, answer_only=answer_only)
        i += 1


def passkey_training_stream(
    tokenizer: Optional[TokenizerLike],
    seq_len: int,
    *,
    depth_range: Tuple[float, float] = (0.0, 1.0),
    key_digits: int = 5,
    seed: int = 0,
    answer_only: bool = True,
) -> Iterator[TrainingSequence]:
    """Endless passkey training sequences of ``seq_len`` tokens, depth uniform in the range."""
    _check_int("seq_len", seq_len, 2)
    _check_int("key_digits", key_digits, 1)
    lo, hi = _check_depth(depth_range[0]), _check_depth(depth_range[1])
    if lo > hi:
        raise ValueError(f"depth_range={depth_range!r} must have lo <= hi")
    enc = _Encoder(tokenizer)
    i = 0
    while True:
        rng = _rng("passkey", "train", seed, i)
        depth = rng.uniform(lo, hi)
        ex = _build_passkey(
            enc, rng, length=seq_len, depth=depth, key_digits=key_digits, seed=seed, index=i
        )
        yield example_to_training_sequence(ex, answer_only=answer_only)
        i += 1
