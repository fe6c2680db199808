"""Tests for the synthetic long-context tasks (olmo_miras_plugin.eval.tasks) and their scoring.

The checks recompute what each generator claims — needle position, pair distances, story
answers — independently from the decoded text or raw token list, rather than trusting metadata.
"""

from __future__ import annotations

import json
import math
import re
from typing import Dict, List, Tuple

import pytest
import torch

from olmo_core.data.utils import get_labels
from olmo_miras_plugin.eval import (
    BABI_LOCATIONS,
    BABI_NAMES,
    BABI_OBJECTS,
    IGNORE_INDEX,
    BabilongTaskConfig,
    EvalExample,
    MQARTaskConfig,
    MQARTokenSpec,
    PasskeyTaskConfig,
    babilong_examples,
    collate_training_sequences,
    format_position_table,
    format_table,
    logits_fn_from_module,
    make_babilong_example,
    make_mqar_example,
    make_mqar_token_example,
    make_passkey_example,
    mqar_examples,
    mqar_token_examples,
    mqar_token_training_stream,
    mqar_training_stream,
    passkey_examples,
    passkey_training_stream,
    perplexity_by_position,
    score_examples,
)
from olmo_miras_plugin.tokenizer import ByteTokenizer

BYTE_VOCAB = ByteTokenizer.vocab_size


class WordTokenizer:
    """A toy multi-character tokenizer (words, 2-digit chunks, single other chars)."""

    def __init__(self) -> None:
        self.vocab: Dict[str, int] = {}
        self.inv: List[str] = []

    def encode(self, text: str) -> List[int]:
        ids = []
        for piece in re.findall(r"[A-Za-z]+|\d{1,2}|.", text, flags=re.S):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.inv)
                self.inv.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids: List[int]) -> str:
        return "".join(self.inv[i] for i in ids)


def _find_sub(seq: List[int], sub: List[int]) -> List[int]:
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if seq[i : i + n] == sub]


def _all_tasks(tokenizer=None, seed: int = 0) -> List[EvalExample]:
    return (
        passkey_examples(
            tokenizer, lengths=(300, 777), depths=(0.0, 0.5, 1.0), n_per_cell=2, seed=seed
        )
        + mqar_examples(
            tokenizer,
            lengths=(500, 901),
            n_pairs=(4, 8),
            distances=(0, 64),
            n_per_cell=2,
            seed=seed,
        )
        + mqar_token_examples(
            lengths=(64, 129), n_pairs=(4, 8), distances=(0, 16), n_per_cell=2, seed=seed
        )
        + babilong_examples(tokenizer, "qa1", lengths=(400, 1000), n_per_cell=2, seed=seed)
        + babilong_examples(tokenizer, "qa2", lengths=(400, 1000), n_per_cell=2, seed=seed)
    )


# ------------------------------------------------------------------------------------------------
# Determinism and lengths
# ------------------------------------------------------------------------------------------------


def test_determinism_and_seed_sensitivity():
    a = [e.to_dict() for e in _all_tasks(seed=3)]
    b = [e.to_dict() for e in _all_tasks(seed=3)]
    c = [e.to_dict() for e in _all_tasks(seed=4)]
    assert a == b
    assert len(a) == len(c)
    differing = sum(x["input_ids"] != y["input_ids"] for x, y in zip(a, c))
    assert differing == len(a)
    # Examples within a cell differ from each other too.
    pk = passkey_examples(lengths=(500,), depths=(0.5,), n_per_cell=3)
    assert len({tuple(e.input_ids) for e in pk}) == 3


def test_example_independent_of_grid():
    grid = passkey_examples(lengths=(300, 600), depths=(0.25, 0.75), n_per_cell=2, seed=9)
    single = make_passkey_example(length=600, depth=0.75, seed=9, index=1)
    assert single.to_dict() in [e.to_dict() for e in grid]
    mq = mqar_token_examples(lengths=(100,), n_pairs=5, distances=(10, 20), n_per_cell=2, seed=1)
    assert make_mqar_token_example(100, 5, 20, seed=1, index=0).to_dict() == mq[2].to_dict()


@pytest.mark.parametrize("tok_name", ["bytes", "words"])
def test_exact_lengths_and_spans(tok_name):
    tok = ByteTokenizer() if tok_name == "bytes" else WordTokenizer()
    exs = _all_tasks(tok)
    for ex in exs:
        assert len(ex.input_ids) + len(ex.target_ids) == ex.length, ex.task
        assert ex.input_ids, ex.task
        assert len(ex.answer_spans) == len(ex.answers)
        for (s, e), ans in zip(ex.answer_spans, ex.answers):
            assert 0 <= s < e <= len(ex.target_ids)
            if ex.task != "mqar_tokens":
                assert tok.decode(ex.target_ids[s:e]).strip() == ans
        if ex.task != "mqar_tokens":
            assert ex.prompt_text == tok.decode(ex.input_ids)
            assert ex.target_text == tok.decode(ex.target_ids)
    # Boundary: the smallest feasible passkey length has no filler at all.
    ex = make_passkey_example(length=300, depth=0.5)
    minimal = ex.length - ex.metadata["filler_tokens"]
    tiny = make_passkey_example(length=minimal, depth=0.3)
    assert tiny.metadata["filler_tokens"] == 0 and len(tiny.full_ids) == minimal


# ------------------------------------------------------------------------------------------------
# Content checks (independent of the generators' metadata)
# ------------------------------------------------------------------------------------------------

_QUESTION = "\nWhat is the pass key? The pass key is"


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_needle_present_at_depth(depth):
    for length in (400, 2000):
        ex = make_passkey_example(length=length, depth=depth, seed=5)
        key = ex.answers[0]
        assert re.fullmatch(r"[1-9]\d{4}", key) and ex.target_text == " " + key
        text = ex.prompt_text
        assert text.endswith(_QUESTION)
        needle = f" The pass key is {key}. Remember it. {key} is the pass key."
        assert text.count(needle) == 1
        # The key is the only number in the prompt.
        assert re.findall(r"\d+", text) == [key, key]
        start = text.index(needle)  # byte tokenizer: char offset == token offset (ASCII)
        assert start == ex.metadata["needle_start"]
        n_filler = len(text) - len(needle) - len(_QUESTION)
        assert abs(start - depth * n_filler) <= 80  # at most one filler sentence away
        # The filler carries no digits, '=', ';', '?' or bAbI entities.
        filler = text[:start] + text[start + len(needle) : -len(_QUESTION)]
        assert not re.search(r"[\d=;?]", filler)
        for w in BABI_NAMES + BABI_LOCATIONS + BABI_OBJECTS:
            assert w.lower() not in filler.lower()


def test_passkey_needle_tokens_with_other_tokenizer():
    tok = WordTokenizer()
    ex = make_passkey_example(tok, length=700, depth=0.6, seed=2)
    key = ex.answers[0]
    needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
    hits = _find_sub(ex.input_ids, needle)
    assert hits == [ex.metadata["needle_start"]]
    n_filler = len(ex.input_ids) - len(needle) - len(tok.encode(_QUESTION))
    assert abs(hits[0] - 0.6 * n_filler) <= 15
    assert ex.target_ids == tok.encode(" " + key)


def test_passkey_depth_extremes():
    ex0 = make_passkey_example(length=1500, depth=0.0)
    ex1 = make_passkey_example(length=1500, depth=1.0)
    q = len(ByteTokenizer().encode(_QUESTION))
    assert ex1.metadata["needle_end"] == len(ex1.input_ids) - q  # right before the question
    assert ex0.metadata["needle_start"] < 80  # after at most the leading sentence fragment


def test_mqar_text_pairs_and_distances():
    for distance in (0, 37, 300):
        ex = make_mqar_example(
            length=1200, n_pairs=12, distance=distance, n_queries=9, seed=distance
        )
        full = ex.prompt_text + ex.target_text
        hits: Dict[str, List[Tuple[int, int, str]]] = {}
        for m in re.finditer(r" ([a-z]{4})=(\d{3});", full):
            hits.setdefault(m.group(1), []).append((m.start(), m.end(), m.group(2)))
        assert len(hits) == 12
        pair_ends, query_starts, answers = [], [], []
        queried = sorted((occ[1][0], k) for k, occ in hits.items() if len(occ) == 2)
        assert len(queried) == 9 and all(len(o) in (1, 2) for o in hits.values())
        for _, key in queried:
            (p_start, p_end, p_val), (q_start, _, q_val) = hits[key]
            assert p_val == q_val  # the query repeats its pair's value
            pair_ends.append(p_end)
            query_starts.append(q_start)
            answers.append(p_val)
        assert answers == ex.answers
        distances = [q - p for q, p in zip(query_starts, pair_ends)]
        assert distances == ex.metadata["query_distances"]
        assert min(distances) >= distance
        last_pair_end = max(o[0][1] for o in hits.values())
        assert min(query_starts) - last_pair_end == distance
        # The prompt stops right after the first query's "key=".
        assert ex.prompt_text.endswith(f" {queried[0][1]}=")


def test_mqar_token_form_ranges_and_recall():
    spec = MQARTokenSpec(
        vocab_size=300, noise_range=(0, 50), key_range=(50, 90), value_range=(200, 300)
    )
    ex = make_mqar_token_example(
        length=200, n_pairs=20, distance=40, n_queries=15, seed=3, spec=spec
    )
    ids = ex.full_ids
    seen: Dict[int, List[int]] = {}
    for t, tok in enumerate(ids):
        if 50 <= tok < 90:
            seen.setdefault(tok, []).append(t)
            assert 200 <= ids[t + 1] < 300  # every key is followed by its value
        elif not 200 <= tok < 300:
            assert 0 <= tok < 50  # everything else is noise
            assert not (t > 0 and 50 <= ids[t - 1] < 90)
    assert len(seen) == 20 and sum(len(v) == 2 for v in seen.values()) == 15
    queries = sorted((pos[1], k) for k, pos in seen.items() if len(pos) == 2)
    p = len(ex.input_ids)
    for (q_pos, key), (s, e), ans in zip(queries, ex.answer_spans, ex.answers):
        first = seen[key][0]
        assert ids[q_pos + 1] == ids[first + 1] == int(ans)
        assert (p + s, p + e) == (q_pos + 1, q_pos + 2)
    dists = [q_pos - (seen[k][0] + 2) for q_pos, k in queries]
    assert dists == ex.metadata["query_distances"] and min(dists) >= 40


def _interpret_babi(text: str, task: str) -> str:
    """A tiny independent bAbI interpreter over the decoded prompt."""
    names = "|".join(BABI_NAMES)
    move = re.compile(rf"\b({names}) (?:went|moved|journeyed|travelled|went back) to the (\w+)\.")
    take = re.compile(rf"\b({names}) (?:picked up|grabbed|got|took) the (\w+)\.")
    drop = re.compile(rf"\b({names}) (?:dropped|put down|discarded) the (\w+)\.")
    events = []
    for kind, rx in (("move", move), ("take", take), ("drop", drop)):
        events += [(m.start(), kind, m.group(1), m.group(2)) for m in rx.finditer(text)]
    events.sort()
    story, question = text.rsplit("\nQuestion:", 1)
    assert all(pos < len(story) for pos, *_ in events)
    where: Dict[str, str] = {}
    holder: Dict[str, str] = {}
    left_at: Dict[str, str] = {}
    for _, kind, person, thing in events:
        if kind == "move":
            where[person] = thing
        elif kind == "take":
            holder[thing] = person
            left_at.pop(thing, None)
        else:
            assert holder.pop(thing) == person
            left_at[thing] = where[person]
    if task == "qa1":
        who = re.search(r"Where is (\w+)\?", question).group(1)
        return where[who]
    obj = re.search(r"Where is the (\w+)\?", question).group(1)
    return where[holder[obj]] if obj in holder else left_at[obj]


@pytest.mark.parametrize("task, n_facts", [("qa1", None), ("qa2", None), ("qa1", 12), ("qa2", 16)])
def test_babilong_answers_match_story(task, n_facts):
    exs = babilong_examples(
        task=task, lengths=(1000, 1500), n_per_cell=25, seed=11, n_facts=n_facts
    )
    for ex in exs:
        text = ex.prompt_text
        assert _interpret_babi(text, task) == ex.answers[0] == ex.target_text.strip()
        facts = ex.metadata["facts"]
        # Facts appear in order, each at its stated token offset.
        for fact, start in zip(facts, ex.metadata["fact_starts"]):
            assert text[start : start + len(fact) + 1] == " " + fact
        assert ex.metadata["fact_starts"] == sorted(ex.metadata["fact_starts"])
        # Entities occur only inside the facts and the question.
        story = text.rsplit("\nQuestion:", 1)[0]
        for fact in facts:
            story = story.replace(fact, "", 1)
        for w in BABI_NAMES + BABI_LOCATIONS + BABI_OBJECTS:
            assert w not in story
    assert {e.answers[0] for e in exs} <= set(BABI_LOCATIONS)


def test_babilong_qa2_needs_two_facts():
    exs = babilong_examples(task="qa2", lengths=(600,), n_per_cell=20, seed=0)
    for ex in exs:
        assert len(ex.metadata["supporting_facts"]) == 2
        assert ex.metadata["subject"] in BABI_OBJECTS


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


def _oracle(vocab: int, shift: int = 0, value: float = 10.0):
    """Puts all mass on the true next token (``shift=1``: on a wrong one)."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, vocab)
        nxt = (ids[:, 1:] + shift) % vocab
        logits[:, :-1].scatter_(2, nxt[..., None], value)
        return logits

    return fn


def test_scoring_oracle_wrong_uniform():
    exs = [e for e in _all_tasks() if e.task != "mqar_tokens"]
    good = score_examples(_oracle(BYTE_VOCAB), exs, batch_size=3)
    assert good.accuracy() == 1.0
    assert all(c.accuracy == 1.0 and c.query_accuracy == 1.0 for c in good.cells)
    expected_lp = 10.0 - math.log(math.exp(10.0) + BYTE_VOCAB - 1)
    assert all(abs(e.answer_logprob_mean - expected_lp) < 1e-5 for e in good.examples)

    wrong = score_examples(_oracle(BYTE_VOCAB, shift=1), exs, batch_size=4)
    assert wrong.accuracy() == 0.0 and all(c.query_accuracy == 0.0 for c in wrong.cells)

    uniform = score_examples(lambda ids: torch.zeros(*ids.shape, BYTE_VOCAB), exs)
    assert uniform.accuracy() == 0.0  # ties never count as correct
    assert all(abs(e.answer_logprob_mean + math.log(BYTE_VOCAB)) < 1e-5 for e in uniform.examples)
    for ex, sc in zip(exs, uniform.examples):
        assert sc.n_answer_tokens == sum(e - s for s, e in ex.answer_spans)
        assert abs(sc.answer_logprob + sc.n_answer_tokens * math.log(BYTE_VOCAB)) < 1e-4


def test_scoring_cells_partial_and_per_query():
    exs = mqar_token_examples(lengths=(80,), n_pairs=6, distances=(8, 16), n_per_cell=2, seed=0)
    by_seq = {tuple(e.full_ids): e for e in exs}
    base = _oracle(256)

    def half(ids: torch.Tensor) -> torch.Tensor:
        """Oracle, except index-1 examples get their first query wrong."""
        logits = base(ids)
        for b in range(ids.shape[0]):
            ex = by_seq[tuple(ids[b].tolist())]
            if ex.index == 1:
                p = ex.answer_positions()[0][0]
                logits[b, p - 1] = 0.0
                logits[b, p - 1, (ids[b, p] + 1) % 256] = 10.0
        return logits

    res = score_examples(half, exs, batch_size=3)
    assert [(c.distance, c.n_examples) for c in res.cells] == [(8, 2), (16, 2)]
    for c in res.cells:
        assert c.accuracy == 0.5
        assert abs(c.query_accuracy - 11 / 12) < 1e-9
    for s in res.examples:
        assert s.query_correct == ([False] + [True] * 5 if s.index == 1 else [True] * 6)
    table = format_table(res)
    assert "mqar_tokens" in table and "0.917" in table
    blob = json.loads(json.dumps(res.to_dict()))
    assert blob["summary"]["mqar_tokens"]["accuracy"] == 0.5 and len(blob["examples"]) == 4


def test_scoring_rejects_bad_logits():
    ex = make_passkey_example(length=200)
    with pytest.raises(ValueError, match="logits_fn must return"):
        score_examples(lambda ids: torch.zeros(ids.shape[0], BYTE_VOCAB), [ex])
    with pytest.raises(ValueError, match="batch_size=0"):
        score_examples(_oracle(BYTE_VOCAB), [ex], batch_size=0)


def test_perplexity_by_position_hand_computed():
    vocab = 3
    table = torch.tensor(
        [[2.0, 0.0, 0.0], [0.0, 1.0, -1.0], [0.5, 0.5, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    )

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return table[: ids.shape[1]].expand(ids.shape[0], -1, -1).clone()

    def nll(row: int, tok: int) -> float:
        r = table[row].tolist()
        return -(r[tok] - math.log(sum(math.exp(v) for v in r)))

    docs = [[0, 1, 2, 1, 0], [2, 0, 2]]  # lengths 5 and 3
    out = perplexity_by_position(fn, docs, [1, 2, 4, 10])
    # doc0 predicts t=1..4, doc1 predicts t=1..2
    b0 = [nll(0, 1), nll(0, 0)]
    b1 = [nll(1, 2), nll(2, 1), nll(1, 2)]
    b2 = [nll(3, 0)]
    for bucket, vals in zip(out, (b0, b1, b2)):
        assert bucket.n_tokens == len(vals)
        assert abs(bucket.mean_loss - sum(vals) / len(vals)) < 1e-6
        assert abs(bucket.perplexity - math.exp(sum(vals) / len(vals))) < 1e-5
    assert [(b.start, b.end) for b in out] == [(1, 2), (2, 4), (4, 10)]
    # Tensor input, and a bucket no document reaches.
    out2 = perplexity_by_position(fn, torch.tensor([docs[0]]), [0, 1, 5, 8], batch_size=2)
    assert [b.n_tokens for b in out2] == [0, 4, 0]
    assert out2[0].mean_loss is None and out2[2].perplexity is None
    expected = [nll(0, 1), nll(1, 2), nll(2, 1), nll(3, 0)]
    assert abs(out2[1].mean_loss - sum(expected) / 4) < 1e-6
    assert "[1, 5)" in format_position_table(out2)
    with pytest.raises(ValueError, match="strictly increasing"):
        perplexity_by_position(fn, docs, [0, 4, 4])
    with pytest.raises(ValueError, match="at least two edges"):
        perplexity_by_position(fn, docs, [3])
    with pytest.raises(ValueError, match="document 0 has 1 tokens"):
        perplexity_by_position(fn, [[1]], [0, 2])


# ------------------------------------------------------------------------------------------------
# Training streams
# ------------------------------------------------------------------------------------------------


def _check_training(seq, seq_len: int) -> None:
    assert seq.input_ids.shape == seq.label_mask.shape == seq.labels.shape == (seq_len,)
    ref = get_labels({"input_ids": seq.input_ids[None], "label_mask": seq.label_mask[None]})[0]
    assert torch.equal(ref, seq.labels)  # same as OLMo-core's own shift
    scored = (seq.labels != IGNORE_INDEX).nonzero().flatten()
    assert len(scored) > 0
    assert torch.equal(seq.labels[scored], seq.input_ids[scored + 1])


def test_training_streams():
    it = mqar_token_training_stream(96, n_pairs=(4, 8), distance=(8, 24), seed=1)
    seqs = [next(it) for _ in range(6)]
    for s in seqs:
        _check_training(s, 96)
        values = s.labels[s.labels != IGNORE_INDEX]
        assert ((values >= 160) & (values < 256)).all()  # only values are supervised
        keys = s.input_ids[(s.labels != IGNORE_INDEX).nonzero().flatten()]
        assert ((keys >= 64) & (keys < 160)).all()  # ... predicted from the query key
    batch = collate_training_sequences(seqs)
    assert batch["input_ids"].shape == (6, 96) and batch["labels"].dtype == torch.long
    again = list(
        zip(range(6), mqar_token_training_stream(96, n_pairs=(4, 8), distance=(8, 24), seed=1))
    )
    assert all(torch.equal(a.input_ids, b.input_ids) for a, (_, b) in zip(seqs, again))

    pk = passkey_training_stream(None, 256, seed=0)
    eval_ids = {
        tuple(e.full_ids)
        for e in passkey_examples(lengths=(256,), depths=(0.0, 0.5, 1.0), n_per_cell=3)
    }
    for _ in range(4):
        s = next(pk)
        _check_training(s, 256)
        assert int((s.labels != IGNORE_INDEX).sum()) == 6  # " " + 5 key digits
        assert tuple(s.input_ids.tolist()) not in eval_ids

    tx = mqar_training_stream(None, 400, n_pairs=6, distance=32, seed=0, answer_only=False)
    s = next(tx)
    _check_training(s, 400)
    assert int((s.labels != IGNORE_INDEX).sum()) == 399
    with pytest.raises(ValueError, match="same length"):
        collate_training_sequences([seqs[0], s])


def test_configs_match_functions():
    assert [
        e.to_dict() for e in PasskeyTaskConfig(lengths=(300,), depths=(0.5,), n_per_cell=2).build()
    ] == [e.to_dict() for e in passkey_examples(lengths=(300,), depths=(0.5,), n_per_cell=2)]
    tok_cfg = MQARTaskConfig(
        lengths=(64,), n_pairs=(4,), distances=(8,), n_per_cell=2, token_form=True
    )
    assert [e.task for e in tok_cfg.build()] == ["mqar_tokens"] * 2
    assert len(MQARTaskConfig(lengths=(400,), distances=(16,), n_per_cell=1).build()) == 1
    assert (
        BabilongTaskConfig(task="qa2", lengths=(500,), n_per_cell=3).build()[2].task
        == "babilong_qa2"
    )
    json.dumps(MQARTaskConfig().as_dict())


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_passkey_example(length=20), r"length=20 is too short for passkey"),
        (lambda: make_passkey_example(length=500, depth=1.5), r"depth=1\.5"),
        (lambda: make_passkey_example(length=500, depth=-0.1), r"depth=-0\.1"),
        (lambda: passkey_examples(lengths=(500,), depths=(0.5, 2)), r"depth=2"),
        (lambda: make_passkey_example(length=500, key_digits=0), r"key_digits=0"),
        (
            lambda: make_mqar_example(length=5000, n_pairs=2000),
            r"n_pairs=2000 exceeds .*key_vocab_size=1024",
        ),
        (
            lambda: make_mqar_example(length=100, n_pairs=8, distance=10),
            r"length=100 is too short for mqar",
        ),
        (
            lambda: make_mqar_example(length=500, n_pairs=4, n_queries=5),
            r"n_queries=5 exceeds n_pairs=4",
        ),
        (lambda: make_mqar_example(length=500, n_pairs=4, distance=-1), r"distance=-1"),
        (lambda: make_mqar_example(length=500, key_vocab_size=10**6), r"key_vocab_size=1000000"),
        (
            lambda: make_mqar_token_example(length=500, n_pairs=200),
            r"n_pairs=200 exceeds the 96 distinct keys",
        ),
        (
            lambda: make_mqar_token_example(length=30, n_pairs=8, distance=0),
            r"length=30 is too short",
        ),
        (
            lambda: make_mqar_token_example(spec=MQARTokenSpec(key_range=(60, 160))),
            r"noise_range=\(0, 64\) overlaps key_range=\(60, 160\)",
        ),
        (
            lambda: make_mqar_token_example(spec=MQARTokenSpec(vocab_size=200)),
            r"value_range=\(160, 256\)",
        ),
        (lambda: make_babilong_example(task="qa3"), r"task='qa3'"),
        (
            lambda: make_babilong_example(task="qa1", length=40),
            r"length=40 is too short for babilong_qa1",
        ),
        (lambda: make_babilong_example(task="qa2", n_facts=1), r"n_facts=1"),
        (
            lambda: next(mqar_token_training_stream(64, n_pairs=4, distance=(9, 3))),
            r"distance=\(9, 3\)",
        ),
        (lambda: next(passkey_training_stream(None, 256, depth_range=(0.0, 1.2))), r"depth=1\.2"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_hf_fast_tokenizer_lengths():
    """A real BPE tokenizer (trained in memory, no download) keeps lengths exact."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [e.prompt_text + e.target_text for e in _all_tasks() if e.task != "mqar_tokens"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>")
    assert hf.encode("the river")[0] == bos  # encode() adds BOS by default ...
    exs = _all_tasks(hf)  # ... but must not inside the generated segments
    for ex in exs:
        assert len(ex.full_ids) == ex.length
        if ex.task != "mqar_tokens":
            assert bos not in ex.full_ids
            for (s, e), ans in zip(ex.answer_spans, ex.answers):
                assert hf.decode(ex.target_ids[s:e]).strip() == ans


def test_logits_fn_from_module():
    class Tiny(torch.nn.Module):
        def __init__(self, hf_style: bool) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(BYTE_VOCAB, 8)
            self.out = torch.nn.Linear(8, BYTE_VOCAB)
            self.hf_style = hf_style

        def forward(self, ids: torch.Tensor):
            logits = self.out(self.emb(ids))
            return type("Out", (), {"logits": logits})() if self.hf_style else logits

    exs = passkey_examples(lengths=(128,), depths=(0.5,), n_per_cell=2)
    for hf_style in (False, True):
        res = score_examples(logits_fn_from_module(Tiny(hf_style)), exs)
        assert len(res.examples) == 2 and all(math.isfinite(e.answer_logprob) for e in res.examples)


def test_perplexity_by_position_long_document_matches_direct():
    """Crosses the internal sequence chunking; must equal a direct full cross-entropy."""
    gen = torch.Generator().manual_seed(0)
    vocab, seq = 40, 5000
    weights = torch.randn(vocab, vocab, generator=gen)
    docs = torch.randint(0, vocab, (2, seq), generator=gen)
    out = perplexity_by_position(
        lambda ids: weights[ids], docs, [1, 100, 2049, 4097, seq], batch_size=2
    )
    nll = torch.nn.functional.cross_entropy(
        weights[docs][:, :-1].reshape(-1, vocab), docs[:, 1:].reshape(-1), reduction="none"
    ).view(2, seq - 1)
    for b in out:
        assert b.n_tokens == 2 * (b.end - b.start)
        assert abs(b.mean_loss - nll[:, b.start - 1 : b.end - 1].double().mean().item()) < 1e-6
