"""Data preparation: local corpora -> OLMo-core token files, read back with OLMo-core itself."""

from __future__ import annotations

import importlib.util
import json
import re
import sysconfig
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from olmo_core.data import (
    NumpyDataLoaderConfig,
    NumpyFSLDatasetConfig,
    NumpyPackedFSLDatasetConfig,
)
from olmo_core.data.utils import iter_document_indices

from olmo_miras_plugin.data import (
    MANIFEST_NAME,
    PrepareDataConfig,
    PrepareDataError,
    dtype_for_vocab_size,
    load_prepared_data,
    prepare_data,
    prepare_stdlib_corpus,
    stdlib_source_files,
)
from olmo_miras_plugin.data import prepare as prepare_mod
from olmo_miras_plugin.tokenizer import ByteTokenizer, byte_tokenizer_config

TOK = ByteTokenizer()
REPO = Path(__file__).resolve().parents[1]


def byte_doc(text: str) -> List[int]:
    """Independent expectation: BOS + UTF-8 bytes + EOS."""
    return [TOK.bos_token_id] + list(text.encode("utf-8")) + [TOK.eos_token_id]


def spans_of(docs: Sequence[Sequence[int]]) -> List[Tuple[int, int]]:
    out, start = [], 0
    for d in docs:
        out.append((start, start + len(d)))
        start += len(d)
    return out


def read_tokens(path: str, dtype) -> np.ndarray:
    return np.fromfile(path, dtype=dtype)


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cfg(inputs, out, **kw) -> PrepareDataConfig:
    kw.setdefault("show_progress", False)
    return PrepareDataConfig(inputs=[str(i) for i in inputs], output_dir=str(out), **kw)


# --------------------------------------------------------------------------------------------------


def test_mixed_inputs_round_trip_through_olmo_core(tmp_path: Path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts_dir = {
        "a.md": "# Title\n\nSome *markdown*.\n",
        "b.txt": "plain text with unicode: héllo ✓ 日本\n",
        "sub/c.py": "def f(x):\n    return x + 1\n",
    }
    for name, text in texts_dir.items():
        (corpus / name).write_text(text, encoding="utf-8")
    (corpus / "__pycache__").mkdir()
    (corpus / "__pycache__" / "c.cpython-311.pyc").write_bytes(b"\x00junk")  # skipped in dirs
    jsonl_texts = ["first record", "second ✓ record\nwith a newline", "third"]
    jsonl = write_jsonl(
        tmp_path / "docs.jsonl", [{"content": t, "id": i} for i, t in enumerate(jsonl_texts)]
    )
    parquet_texts = ["parquet row one", "parquet row two, longer than the others by a bit"]
    pq.write_table(pa.table({"content": parquet_texts, "n": [1, 2]}), tmp_path / "rows.parquet")

    prepared = prepare_data(
        cfg([corpus, jsonl, tmp_path / "rows.parquet"], tmp_path / "out", text_field="content")
    )

    texts = list(texts_dir.values()) + jsonl_texts + parquet_texts  # dir sorted, then input order
    docs = [byte_doc(t) for t in texts]
    expected = np.concatenate(docs)
    assert prepared.dtype == "uint16" and prepared.numpy_dtype is np.uint16
    assert prepared.tokenizer.bos_token_id == TOK.bos_token_id
    assert prepared.tokenizer.eos_token_id == TOK.eos_token_id
    assert prepared.validation_paths == []
    assert len(prepared.train_paths) == 1
    assert prepared.splits["train"].num_documents == len(texts)
    assert prepared.splits["train"].num_tokens == len(expected)
    path = prepared.train_paths[0]
    assert path.endswith("train/part-00000.npy")
    np.testing.assert_array_equal(read_tokens(path, np.uint16), expected)  # raw, header-less

    # OLMo-core's own boundary finders: from the array (EOS followed by BOS) and from the csv.gz.
    tok = prepared.tokenizer
    for use_array in (True, False):
        found = list(
            iter_document_indices(
                path,
                use_array_if_local=use_array,
                eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id,
                dtype=np.uint16,
            )
        )
        assert found == spans_of(docs)

    # OLMo-core's FSL dataset reads exactly the token stream.
    seq = 16
    ds = NumpyFSLDatasetConfig(
        paths=prepared.train_paths,
        tokenizer=tok,
        dtype=prepared.dataset_dtype,
        sequence_length=seq,
        generate_doc_lengths=True,
        work_dir=str(tmp_path / "work"),
    ).build()
    ds.prepare()
    assert len(ds) == len(expected) // seq
    got = np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))])
    np.testing.assert_array_equal(got, expected[: len(ds) * seq])
    assert int(ds[0]["doc_lens"].sum()) == seq

    # The helper builds the same config; the packed dataset sees whole documents via the csv.gz.
    assert prepared.dataset_config(sequence_length=seq).paths == prepared.train_paths
    packed = NumpyPackedFSLDatasetConfig(
        paths=prepared.train_paths,
        tokenizer=tok,
        dtype=prepared.dataset_dtype,
        sequence_length=1 << (max(len(d) for d in docs) - 1).bit_length(),  # OBFD: power of 2
        use_array_if_local=False,
        generate_doc_lengths=True,
        work_dir=str(tmp_path / "work"),
    ).build()
    packed.prepare()
    packed_docs = []
    for i in range(len(packed)):
        item = packed[i]
        ids = item["input_ids"][item["label_mask"]].tolist()
        for n in item["doc_lens"].tolist()[: len(ids)]:
            if ids:
                packed_docs.append(ids[:n])
                ids = ids[n:]
    assert sorted(map(tuple, packed_docs)) == sorted(tuple(d) for d in docs)
    assert [TOK.decode(d) for d in docs] == texts


def test_split_is_by_document_and_deterministic(tmp_path: Path):
    texts = [f"document number {i} " + "x" * (i % 7) for i in range(300)]
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])

    def run(out: str, seed: int):
        # num_proc=2 exercises the parallel datasets.map path (300 docs > one map batch).
        return prepare_data(
            cfg([src], tmp_path / out, validation_fraction=0.1, seed=seed, num_proc=2)
        )

    a, b, c = run("a", 7), run("b", 7), run("c", 8)

    def doc_texts(paths: List[str]) -> List[str]:
        stream = np.concatenate([read_tokens(p, np.uint16) for p in paths]).tolist()
        out, cur = [], []
        for t in stream:
            cur.append(t)
            if t == TOK.eos_token_id:
                out.append(TOK.decode(cur))
                cur = []
        assert not cur
        return out

    train, val = doc_texts(a.train_paths), doc_texts(a.validation_paths)
    assert len(val) == 30 == a.splits["validation"].num_documents
    assert len(train) == 270 == a.splits["train"].num_documents
    assert sorted(train + val) == sorted(texts)
    assert train == [t for t in texts if t in set(train)]  # corpus order kept within a split
    for split in ("train", "validation"):
        for pa_, pb in zip(a.splits[split].paths, b.splits[split].paths):
            assert Path(pa_).read_bytes() == Path(pb).read_bytes()
            assert Path(pa_).with_suffix("").with_suffix(".csv.gz").exists()
    assert doc_texts(c.validation_paths) != val


def test_max_tokens_per_file_is_respected(tmp_path: Path):
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdef \n"), size=int(n))) for n in rng.integers(1, 40, 25)]
    texts[10] = "L" * 150  # longer than a file: the only document allowed to span files
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i:02d}.txt").write_text(t)
    cap = 64
    prepared = prepare_data(cfg([tmp_path / "doc*.txt"], tmp_path / "out", max_tokens_per_file=cap))

    docs = [byte_doc(t) for t in texts]
    files = prepared.splits["train"].files
    assert len(files) > 3
    assert prepared.num_split_documents == 1
    streams = [read_tokens(f.path, np.uint16) for f in files]
    for f, s in zip(files, streams):
        assert 0 < len(s) == f.num_tokens <= cap
    np.testing.assert_array_equal(np.concatenate(streams), np.concatenate(docs))
    long_doc = set(range(*spans_of(docs)[10]))
    offset = 0
    for s in streams:  # every file that doesn't hold part of the long document holds whole docs
        if not long_doc & set(range(offset, offset + len(s))):
            assert s[0] == TOK.bos_token_id and s[-1] == TOK.eos_token_id
        offset += len(s)

    ds = NumpyFSLDatasetConfig(
        paths=prepared.train_paths,
        tokenizer=prepared.tokenizer,
        dtype=prepared.dataset_dtype,
        sequence_length=8,
        work_dir=str(tmp_path / "work"),
    ).build()
    ds.prepare()
    assert len(ds) == sum(len(s) // 8 for s in streams)  # OLMo-core drops each file's remainder


def _save_word_tokenizer(path: Path, num_words: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, "[PAD]": 2}
    vocab.update({f"w{i}": i + 3 for i in range(num_words)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]"
    ).save_pretrained(str(path))


def test_local_hf_tokenizer_with_uint32_vocab(tmp_path: Path):
    from transformers import AutoTokenizer

    assert dtype_for_vocab_size(259) is np.uint16
    assert dtype_for_vocab_size(65536) is np.uint16
    assert dtype_for_vocab_size(65537) is np.uint32

    tok_dir = tmp_path / "tok"
    _save_word_tokenizer(tok_dir, 70_000)
    texts = ["w1 w69999 w5", "w65600 unknownword w0"]
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    prepared = prepare_data(cfg([src], tmp_path / "out", tokenizer=str(tok_dir)))

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    expected = np.concatenate(
        [hf.encode(t, add_special_tokens=False) + [hf.eos_token_id] for t in texts]
    )
    assert prepared.dtype == "uint32"
    assert prepared.tokenizer.vocab_size == 70_003 and prepared.tokenizer.bos_token_id is None
    assert prepared.tokenizer.pad_token_id == 2 and prepared.tokenizer.eos_token_id == 1
    np.testing.assert_array_equal(read_tokens(prepared.train_paths[0], np.uint32), expected)
    ds = prepared.dataset_config(sequence_length=2, work_dir=str(tmp_path / "work")).build()
    ds.prepare()
    got = np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))])
    np.testing.assert_array_equal(got, expected[: len(got)])
    assert int(got.max()) >= 65536


def test_no_bos_writes_eos_only_and_records_it(tmp_path: Path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("de")
    inputs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    prepared = prepare_data(cfg(inputs, tmp_path / "out", add_bos=False))
    assert prepared.tokenizer.bos_token_id is None
    tokens = read_tokens(prepared.train_paths[0], np.uint16).tolist()
    assert tokens == [97, 98, 99, 256, 100, 101, 256]
    assert load_prepared_data(tmp_path / "out").tokenizer.bos_token_id is None


def _err_cases(tmp: Path):
    (tmp / "ok.txt").write_text("fine")
    (tmp / "blob.bin").write_bytes(b"\x00\x01")
    (tmp / "bad.txt").write_bytes(b"caf\xe9")
    (tmp / "empty.txt").write_text("")
    (tmp / "onlybin").mkdir()
    (tmp / "onlybin" / "x.bin").write_bytes(b"x")
    write_jsonl(tmp / "nofield.jsonl", [{"body": "x"}, {"body": "y"}])
    write_jsonl(tmp / "hole.jsonl", [{"text": "x"}, {"other": 1}, {"text": "z"}])
    write_jsonl(tmp / "blank.jsonl", [{"text": ""}])
    pq.write_table(pa.table({"body": ["x"]}), tmp / "nocol.parquet")
    return [
        (dict(inputs=[tmp / "nomatch*.txt"]), "no input files matched pattern"),
        (dict(inputs=[tmp / "missing.txt"]), "input path does not exist: '"),
        (dict(inputs=[tmp / "blob.bin"]), "unknown file extension '.bin'"),
        (dict(inputs=[tmp / "onlybin"]), "no input files matched in directory"),
        (dict(inputs=[tmp / "bad.txt"]), "is not valid UTF-8"),
        (dict(inputs=[tmp / "nofield.jsonl"]), "jsonl field 'text' missing in '"),
        (dict(inputs=[tmp / "hole.jsonl"]), "missing or null in record 2"),
        (dict(inputs=[tmp / "nocol.parquet"]), "parquet column 'text' missing"),
        (dict(inputs=[tmp / "empty.txt", tmp / "blank.jsonl"]), "empty corpus"),
        (dict(inputs=[tmp / "ok.txt"], validation_fraction=0.5), "leaves no training documents"),
        (dict(inputs=[tmp / "ok.txt"], validation_fraction=1.5), "validation_fraction must be in"),
        (dict(inputs=[tmp / "ok.txt"], max_tokens_per_file=0), "max_tokens_per_file must be"),
        (dict(inputs=[tmp / "ok.txt"], tokenizer=str(tmp / "nope")), "is not a directory"),
        (dict(inputs=[]), "no inputs given"),
    ]


def test_errors_name_the_bad_value(tmp_path: Path):
    for i, (kw, message) in enumerate(_err_cases(tmp_path)):
        inputs = kw.pop("inputs")
        with pytest.raises(PrepareDataError, match=re.escape(message)) as e:
            prepare_data(cfg(inputs, tmp_path / f"out{i}", **kw))
        if "file extension" in message or "field" in message or "column" in message:
            assert str(tmp_path) in str(e.value)  # names the file
    with pytest.raises(PrepareDataError, match="fields present: body"):
        prepare_data(cfg([tmp_path / "nofield.jsonl"], tmp_path / "o"))
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(PrepareDataError, match="output directory .*afile' is an existing file; give a directory"):
        prepare_data(cfg([tmp_path / "nofield.jsonl"], tmp_path / "afile"))
    # A directory walk skips unknown extensions instead of failing.
    (tmp_path / "onlybin" / "note.md").write_text("kept")
    kept = prepare_data(cfg([tmp_path / "onlybin"], tmp_path / "o2"))
    assert kept.splits["train"].num_documents == 1


def test_reuse_overwrite_and_interrupted_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"text {i} " * (i + 1))
    inputs, out = [tmp_path / "*.txt"], tmp_path / "out"
    first = prepare_data(cfg(inputs, out))
    mtime = Path(first.train_paths[0]).stat().st_mtime_ns
    again = prepare_data(cfg(inputs, out))
    assert again.reused and not first.reused
    assert again.train_paths == first.train_paths
    assert Path(first.train_paths[0]).stat().st_mtime_ns == mtime

    with pytest.raises(PrepareDataError, match="token files that were made with other"):
        prepare_data(cfg(inputs, out, validation_fraction=0.25))
    split = prepare_data(cfg(inputs, out, validation_fraction=0.25, overwrite=True))
    assert len(split.validation_paths) == 1 and not split.reused
    back = prepare_data(cfg(inputs, out, overwrite=True))
    assert not (out / "validation").exists()
    assert back.splits["train"].num_documents == 4

    # Kill the run at the first token-file rename: no manifest, no temp leftovers and no
    # complete-looking .npy.
    real = prepare_mod._fsync_replace

    def crash(tmp: Path, final: Path) -> None:
        if final.suffix == ".npy":
            raise KeyboardInterrupt("killed")
        real(tmp, final)

    monkeypatch.setattr(prepare_mod, "_fsync_replace", crash)
    out2 = tmp_path / "out2"
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg(inputs, out2))
    monkeypatch.undo()
    assert not (out2 / MANIFEST_NAME).exists()
    assert not list(out2.rglob("*.npy")) and not list(out2.rglob("*.tmp-*"))
    with pytest.raises(PrepareDataError, match="no valid manifest.json"):
        load_prepared_data(out2)
    with pytest.raises(PrepareDataError, match="incomplete or unrecognized run"):
        prepare_data(cfg(inputs, out2))
    assert prepare_data(cfg(inputs, out2, overwrite=True)).splits["train"].num_documents == 4


def test_stdlib_corpus_is_real_deterministic_and_cached(tmp_path: Path):
    limit = 300_000
    files = stdlib_source_files(max_bytes=limit)
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in files]
    assert files and rel == sorted(rel) and files == stdlib_source_files(max_bytes=limit)
    assert sum(p.stat().st_size for p in files) <= limit
    assert not any({"site-packages", "test", "__pycache__"} & set(p.parts) for p in files)
    assert len(stdlib_source_files(max_files=3)) == 3

    out = tmp_path / "stdlib"
    paths = prepare_stdlib_corpus(out, max_bytes=limit)
    assert paths and all(Path(p).stat().st_size > 0 for p in paths)
    tokens = read_tokens(paths[0], np.uint16)
    first = byte_doc(files[0].read_text(encoding="utf-8"))
    assert tokens[: len(first)].tolist() == first
    assert int(tokens.size) == sum(len(p.read_bytes()) + 2 for p in files)

    mtimes = [Path(p).stat().st_mtime_ns for p in paths]
    assert prepare_stdlib_corpus(out, max_bytes=limit) == paths
    assert [Path(p).stat().st_mtime_ns for p in paths] == mtimes
    data = load_prepared_data(out)
    assert data.num_input_files == len(files) and data.tokenizer == byte_tokenizer_config()

    # What the tiny experiment does: OLMo-core dataset + data loader over the cached files.
    seq = 256
    dataset = NumpyFSLDatasetConfig(
        paths=paths,
        tokenizer=data.tokenizer,
        dtype=data.dataset_dtype,
        sequence_length=seq,
        work_dir=str(tmp_path / "work"),
    ).build()
    loader = NumpyDataLoaderConfig(
        global_batch_size=4 * seq, seed=0, work_dir=str(tmp_path / "work")
    ).build(dataset)
    loader.reshuffle(epoch=1)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, seq)
    assert int(batch["input_ids"].max()) < data.tokenizer.vocab_size
    # Other settings rebuild the cache in place.
    size = sum(Path(p).stat().st_size for p in paths)
    smaller = prepare_stdlib_corpus(out, max_bytes=limit // 2)
    assert 0 < sum(Path(p).stat().st_size for p in smaller) < size


def test_cli_prints_summary_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture):
    script = REPO / "scripts" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data_cli", script)
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    (tmp_path / "a.txt").write_text("hello")
    write_jsonl(tmp_path / "b.jsonl", [{"body": "one"}, {"body": "two"}])
    out = tmp_path / "out"
    argv = [str(tmp_path / "a.txt"), "-o", str(out), "--no-progress"]
    argv += ["--validation-fraction", "0.3"]
    assert cli.main(argv + ["--text-field", "body", str(tmp_path / "b.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "documents" in printed and "train:" in printed and "validation:" in printed
    assert "files written: 2 token files" in printed
    assert load_prepared_data(out).splits["train"].num_documents == 2

    assert cli.main([str(tmp_path / "nope.txt"), "-o", str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "input path does not exist" in capsys.readouterr().err
    argv = ["--stdlib", "--max-files", "2", "-o", str(tmp_path / "s"), "--no-progress"]
    assert cli.main(argv) == 0
    assert "input files: 2" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Regression tests: stdlib cache vs. other corpora, BOS policy of HF tokenizers, rerun messages.


def _save_bos_tokenizer(path: Path, *, bos: str, eos: str, adds_bos: bool) -> None:
    """Word-level HF tokenizer over ``w0..w9``; ``adds_bos``: its post-processor prepends BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "<s>": 2, "</s>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(10)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        t.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
        )
    PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="[UNK]", bos_token=bos, eos_token=eos
    ).save_pretrained(str(path))


def test_hf_tokenizer_gets_bos_only_if_it_adds_one_itself(tmp_path: Path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2"}, {"text": "w3"}])
    words, eot, bos, eos = [[5, 6], [7]], 1, 2, 3

    def run(name: str, **kw):
        prepared = prepare_data(cfg([src], tmp_path / f"out-{name}", **kw))
        manifest = json.loads((tmp_path / f"out-{name}" / MANIFEST_NAME).read_text())
        assert manifest["tokenizer"]["bos_token_id"] == prepared.tokenizer.bos_token_id
        return prepared, read_tokens(prepared.train_paths[0], np.uint16).tolist()

    # GPT-2 style: BOS == EOS == <|endoftext|>, never added by the tokenizer -> no BOS.
    gpt2 = tmp_path / "gpt2"
    _save_bos_tokenizer(gpt2, bos="<|endoftext|>", eos="<|endoftext|>", adds_bos=False)
    prepared, tokens = run("gpt2", tokenizer=str(gpt2))
    assert tokens == words[0] + [eot] + words[1] + [eot]
    assert prepared.tokenizer.bos_token_id is None and prepared.tokenizer.eos_token_id == eot
    with pytest.raises(PrepareDataError, match=r"BOS id 1 equal to its EOS id"):
        prepare_data(cfg([src], tmp_path / "out-gpt2-bos", tokenizer=str(gpt2), add_bos=True))

    # A distinct BOS that the tokenizer does not add -> none by default, explicit True wins.
    quiet = tmp_path / "quiet"
    _save_bos_tokenizer(quiet, bos="<s>", eos="</s>", adds_bos=False)
    prepared, tokens = run("quiet", tokenizer=str(quiet))
    assert tokens == words[0] + [eos] + words[1] + [eos] and prepared.tokenizer.bos_token_id is None
    prepared, tokens = run("quiet-bos", tokenizer=str(quiet), add_bos=True)
    assert tokens == [bos] + words[0] + [eos, bos] + words[1] + [eos]
    assert prepared.tokenizer.bos_token_id == bos

    # A tokenizer that adds its BOS itself (Llama style) -> BOS by default, explicit False wins.
    llama = tmp_path / "llama"
    _save_bos_tokenizer(llama, bos="<s>", eos="</s>", adds_bos=True)
    prepared, tokens = run("llama", tokenizer=str(llama))
    assert tokens == [bos] + words[0] + [eos, bos] + words[1] + [eos]
    assert prepared.tokenizer.bos_token_id == bos
    prepared, tokens = run("llama-nobos", tokenizer=str(llama), add_bos=False)
    assert tokens == words[0] + [eos] + words[1] + [eos] and prepared.tokenizer.bos_token_id is None

    # The byte tokenizer keeps adding its distinct BOS.
    prepared, tokens = run("bytes")
    assert tokens == byte_doc("w1 w2") + byte_doc("w3")
    assert prepared.tokenizer.bos_token_id == TOK.bos_token_id


def test_rerun_names_missing_or_truncated_output_file(tmp_path: Path):
    (tmp_path / "a.txt").write_text("some text")
    inputs, out = [tmp_path / "a.txt"], tmp_path / "out"
    part = Path(prepare_data(cfg(inputs, out)).train_paths[0])
    with open(part, "r+b") as f:
        f.truncate(2)
    with pytest.raises(PrepareDataError) as e:
        prepare_data(cfg(inputs, out))
    assert "incomplete" in str(e.value) and str(part) in str(e.value)
    assert "other inputs or settings" not in str(e.value)
    part.unlink()
    with pytest.raises(PrepareDataError, match=re.escape(f"are incomplete: '{part}'")):
        prepare_data(cfg(inputs, out))
    assert not prepare_data(cfg(inputs, out, overwrite=True)).reused


def test_stdlib_replaces_only_its_own_cache(tmp_path: Path, capsys: pytest.CaptureFixture):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"user document {i}")
    out = tmp_path / "out"
    mine = prepare_data(cfg([corpus], out))
    assert json.loads((out / MANIFEST_NAME).read_text())["source"] == "files"
    before = {p: Path(p).read_bytes() for p in mine.train_paths}

    with pytest.raises(PrepareDataError, match="not a stdlib corpus cache") as e:
        prepare_stdlib_corpus(out, max_bytes=20_000)
    assert str(out) in str(e.value) and "Pick another output directory" in str(e.value)
    script = REPO / "scripts" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data_cli_stdlib", script)
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--stdlib", "--max-bytes", "20000", "-o", str(out), "--no-progress"]
    assert cli.main(argv) == 1
    assert "not a stdlib corpus cache" in capsys.readouterr().err
    # The user's corpus is untouched and still loads.
    assert {p: Path(p).read_bytes() for p in mine.train_paths} == before
    assert load_prepared_data(out).fingerprint == mine.fingerprint

    # A stdlib cache is reused, and replaced by a stdlib run with other settings.
    cache = tmp_path / "cache"
    first = prepare_stdlib_corpus(cache, max_bytes=20_000)
    assert json.loads((cache / MANIFEST_NAME).read_text())["source"] == "stdlib"
    assert prepare_stdlib_corpus(cache, max_bytes=20_000) == first
    prepare_stdlib_corpus(cache, max_bytes=10_000)
    assert load_prepared_data(cache).num_input_files == len(stdlib_source_files(max_bytes=10_000))

    # A cache written before "source" was recorded is still a stdlib cache...
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    del manifest["source"]
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))
    (cache / prepare_mod.STDLIB_MARKER_NAME).unlink()
    prepare_stdlib_corpus(cache, max_bytes=20_000)
    assert load_prepared_data(cache).num_input_files == len(stdlib_source_files(max_bytes=20_000))
    # ... but an old manifest of other inputs is not.
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["source"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PrepareDataError, match="not a stdlib corpus cache"):
        prepare_stdlib_corpus(out, max_bytes=20_000)
    assert {p: Path(p).read_bytes() for p in mine.train_paths} == before

    # An interrupted stdlib run (no manifest) is recognized by its marker and redone.
    (cache / MANIFEST_NAME).unlink()
    assert prepare_stdlib_corpus(cache, max_bytes=10_000)
    # A plain run replacing a stdlib cache (with overwrite) drops the marker with it.
    prepare_data(cfg([corpus], cache, overwrite=True))
    assert not (cache / prepare_mod.STDLIB_MARKER_NAME).exists()
    with pytest.raises(PrepareDataError, match="not a stdlib corpus cache"):
        prepare_stdlib_corpus(cache, max_bytes=10_000)
