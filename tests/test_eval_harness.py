"""The long-context harness, its training callback, the evaluate CLI and the recall experiment.

Why these checks: the harness re-indexes answers into compact examples and streams inputs in
segments, so the tests pin it to the reference scorer (``score_examples`` on whole-sequence
logits) and to an oracle that must score exactly 1.0; the callback is exercised through a real
OLMo-core ``Trainer`` run; the two CLIs are run end to end on tiny models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from olmo_core.train.callbacks import Callback

from olmo_miras_plugin.eval import (
    BabilongTaskConfig,
    MQARTaskConfig,
    PasskeyTaskConfig,
    logits_fn_from_module,
    mqar_token_examples,
    passkey_examples,
    perplexity_by_position,
    score_examples,
)
from olmo_miras_plugin.eval.callback import LongContextEvalCallback
from olmo_miras_plugin.eval.harness import (
    LongContextSuiteConfig,
    evaluate_main,
    PerplexityConfig,
    evaluate_examples,
    load_model_for_eval,
    position_loss,
    run_suite,
    suite_preset,
    supports_streaming,
)
from olmo_miras_plugin.eval.recall_experiment import (
    RecallExperimentConfig,
    build_model,
    main as recall_main,
    mqar_batch,
    parse_variants,
    save_model,
)
from olmo_miras_plugin.eval.tasks import IGNORE_INDEX, MQARTokenSpec
from olmo_miras_plugin.memory import NeuralMemory
from olmo_miras_plugin.models import MirasMemoryConfig, tiny_miras

VOCAB = 259


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny CPU models: one intra-op thread is faster and immune to oversubscription on shared
    machines (two threads on a busy 2-core box made these tests 10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mag_model(_one_thread: None) -> torch.nn.Module:
    """A tiny MAG model whose memory output is *not* zero (so streaming really carries memory)."""
    torch.manual_seed(0)
    cfg = tiny_miras(
        VOCAB, d_model=32, n_layers=2, n_heads=2, window=16,
        memory=MirasMemoryConfig(block_type="mag", layers=[0], chunk_size=8),
    )
    model = cfg.build()
    model.init_weights(max_seq_len=512, device=torch.device("cpu"))
    for m in model.modules():
        if isinstance(m, NeuralMemory):
            torch.nn.init.normal_(m.w_out.weight, std=0.2)
    return model.eval()


def _mixed_examples() -> List:
    return passkey_examples(None, (112,), (0.0, 1.0), 1) + mqar_token_examples((100,), (4,), (24, 60), 2)


# ---------------------------------------------------------------------------------------------- harness
def test_streamed_scores_equal_whole_and_reference(mag_model: torch.nn.Module) -> None:
    examples = _mixed_examples()
    ref = score_examples(logits_fn_from_module(mag_model), examples, batch_size=3)
    whole = evaluate_examples(mag_model, examples, batch_size=3)
    streamed = evaluate_examples(mag_model, examples, batch_size=3, segment_len=13)  # splits mid-chunk
    for a, b, c in zip(ref.examples, whole.examples, streamed.examples):
        assert (a.task, a.length, a.distance, a.depth) == (b.task, b.length, b.distance, b.depth)
        assert a.n_answer_tokens == b.n_answer_tokens == c.n_answer_tokens
        assert b.answer_logprob == pytest.approx(a.answer_logprob, abs=1e-4)
        assert c.answer_logprob == pytest.approx(a.answer_logprob, abs=1e-3)
        assert a.predicted_ids == b.predicted_ids == c.predicted_ids
        assert a.query_correct == b.query_correct == c.query_correct
    assert [x.__dict__ for x in ref.cells] == [x.__dict__ for x in whole.cells]


def test_hf_export_streams_in_the_harness_and_keeps_its_tokenizer(mag_model: torch.nn.Module, tmp_path: Path) -> None:
    """An exported HF model streams through a MirasCache (same scores as the OLMo-core model fed
    whole), loads without a trust-remote-code prompt, and names the tokenizer it was trained with
    even when the directory has no tokenizer files."""
    from olmo_miras_plugin.hf import convert_to_hf
    from olmo_miras_plugin.tokenizer import byte_tokenizer_config

    cfg = tiny_miras(
        VOCAB, d_model=32, n_layers=2, n_heads=2, window=16,
        memory=MirasMemoryConfig(block_type="mag", layers=[0], chunk_size=8),
    )
    hf_dir = tmp_path / "hf"
    convert_to_hf(mag_model, hf_dir, config=cfg, tokenizer_config=byte_tokenizer_config(), validate=False)
    for f in hf_dir.glob("*token*"):
        f.unlink()
    loaded = load_model_for_eval(hf_dir, "cpu")
    assert loaded.kind == "hf" and loaded.tokenizer_spec == "bytes"
    assert supports_streaming(loaded.model)
    examples = _mixed_examples()
    whole = evaluate_examples(mag_model, examples, batch_size=3)
    streamed = evaluate_examples(loaded.model, examples, batch_size=3, segment_len=13)
    for a, b in zip(whole.examples, streamed.examples):
        assert b.answer_logprob == pytest.approx(a.answer_logprob, abs=1e-3)
        assert a.predicted_ids == b.predicted_ids


def test_position_loss_streamed_equals_reference(mag_model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    docs = torch.randint(0, 256, (3, 120), generator=g)
    edges = [1, 16, 40, 64, 120]
    ref = perplexity_by_position(logits_fn_from_module(mag_model), docs, edges)
    got = position_loss(mag_model, docs.tolist(), edges, batch_size=2, segment_len=17)
    for a, b in zip(ref, got):
        assert (a.start, a.end, a.n_tokens) == (b.start, b.end, b.n_tokens)
        assert b.mean_loss == pytest.approx(a.mean_loss, abs=1e-4)


def _oracle(ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced perfect model: logits[t] puts all mass on ids[t + 1]."""
    logits = torch.zeros(ids.shape[0], ids.shape[1], VOCAB)
    logits[:, :-1].scatter_(2, ids[:, 1:, None], 10.0)
    return logits


def test_oracle_scores_one_and_constant_model_zero() -> None:
    suite = LongContextSuiteConfig(
        passkey=PasskeyTaskConfig(lengths=(128,), depths=(0.0, 0.5), n_per_cell=2),
        mqar=MQARTaskConfig(lengths=(200,), n_pairs=(3,), distances=(20,), n_per_cell=2),
        mqar_tokens=MQARTaskConfig(lengths=(96,), n_pairs=(4,), distances=(16, 40), n_per_cell=2),
        babilong_qa1=BabilongTaskConfig(task="qa1", lengths=(200,), n_per_cell=2),
        babilong_qa2=BabilongTaskConfig(task="qa2", lengths=(300,), n_per_cell=2),
        batch_size=3,
    )
    res = run_suite(_oracle, suite)
    assert res.tasks is not None
    assert {c.task for c in res.tasks.cells} == {"passkey", "mqar", "mqar_tokens", "babilong_qa1", "babilong_qa2"}
    assert all(c.accuracy == 1.0 and c.query_accuracy == 1.0 for c in res.tasks.cells)
    flat = run_suite(lambda ids: torch.zeros(ids.shape[0], ids.shape[1], VOCAB), suite)
    assert flat.tasks is not None and all(c.accuracy == 0.0 for c in flat.tasks.cells)


def test_suite_presets_and_errors(mag_model: torch.nn.Module) -> None:
    quick = suite_preset("quick", perplexity=False)
    cells = {(e.length, e.distance) for e in quick.build_examples() if e.task == "mqar_tokens"}
    # every distance that fits a length is scored there; the ones that don't are left out
    assert cells == {(256, 64), (256, 128), (512, 64), (512, 128), (512, 256)}
    assert suite_preset("default", [512]).passkey.lengths == (512,)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown suite"):
        suite_preset("huge")
    with pytest.raises(ValueError, match="vocabulary has only"):
        small = lambda ids: torch.zeros(ids.shape[0], ids.shape[1], 100)  # noqa: E731
        evaluate_examples(small, mqar_token_examples((64,), (2,), (8,), 1))
    with pytest.raises(FileNotFoundError):
        load_model_for_eval("/no/such/checkpoint")


# ---------------------------------------------------------------------------------------------- callback
METRICS: Dict[int, Dict[str, float]] = {}


@dataclass
class _Recorder(Callback):
    def log_metrics(self, step: int, metrics: Dict[str, float]) -> None:
        METRICS.setdefault(step, {}).update(metrics)


def test_callback_records_metrics_in_a_real_trainer_run(tmp_path: Path) -> None:
    from olmo_miras_plugin.train import load_experiment, train

    corpus = tmp_path / "corpus"
    ov = {
        "dataset.data_dir": corpus / "tokens",
        "dataset.work_dir": corpus / "cache",
        "dataset.max_bytes": 200_000,
        "dataset.sequence_length": 64,
        "train_module.max_sequence_length": 64,
        "train_module.rank_microbatch_size": 128,
        "train_module.segment_length": 32,
        "data_loader.global_batch_size": 128,
        "trainer.save_folder": tmp_path / "run",
        "trainer.max_duration.value": 2,
        "trainer.metrics_collect_interval": 1,
        "trainer.callbacks.checkpointer.save_interval": 2,
        "trainer.callbacks.memory_diagnostics.enabled": False,
        "train_module.scheduler.warmup": 1,
    }
    config = load_experiment("tiny_miras", [f"--{k}={v}" for k, v in ov.items()])
    text = tmp_path / "doc.txt"
    text.write_text("import os\nprint(os.getcwd())\n" * 20)
    config.trainer.callbacks["longctx"] = LongContextEvalCallback(
        interval=2, lengths=[112, 128], n_per_cell=1, segment_len=48,
        perplexity=PerplexityConfig(source=str(text), doc_length=128, n_docs=1, bucket_edges=[1, 64, 128]),
    )
    config.trainer.callbacks["recorder"] = _Recorder()
    METRICS.clear()
    train(config)
    last = METRICS[2]
    for name in (
        "eval/longctx/mqar_tokens/acc",
        "eval/longctx/mqar_tokens/acc@112",
        "eval/longctx/mqar_tokens/query_acc@128",
        "eval/longctx/passkey/acc@128",
        "eval/longctx/ppl/loss@64-128",
        "eval/longctx/seconds",
    ):
        assert name in last and math.isfinite(last[name]), name
    assert 0.0 <= last["eval/longctx/mqar_tokens/acc"] <= 1.0
    assert not any(k.startswith("eval/longctx") for k in METRICS.get(1, {}))

    # the trainer's checkpoint is what scripts/evaluate.py loads (save folder -> latest step)
    loaded = load_model_for_eval(tmp_path / "run", "cpu", max_seq_len=128)
    assert (loaded.kind, loaded.step, loaded.tokenizer_spec) == ("olmo_core", 2, "bytes")
    res = evaluate_examples(loaded.model, mqar_token_examples((96,), (4,), (40,), 2), segment_len=32)
    assert len(res.examples) == 2


# ---------------------------------------------------------------------------------------------- CLIs


def test_evaluate_cli_on_a_saved_tiny_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = RecallExperimentConfig.quick()
    model, mc = build_model(cfg, parse_variants("mag:titans")[0], torch.device("cpu"), "chunked")
    ckpt = save_model(model, mc, tmp_path / "ckpt", {"tokenizer": "bytes"})
    loaded = load_model_for_eval(ckpt, "cpu")
    for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    out = tmp_path / "eval"
    text = tmp_path / "doc.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    rc = evaluate_main([
        str(ckpt), "--suite", "quick", "--lengths", "128", "160", "--n-per-cell", "1",
        "--tasks", "mqar_tokens,passkey,ppl", "--ppl-source", str(text), "--ppl-docs", "2",
        "--segment-len", "48", "--output-dir", str(out), "--no-progress", "--device", "cpu",
        "--memory-impl", "chunked",
    ])
    captured = capsys.readouterr()
    stdout = captured.out
    assert rc == 0
    assert "memory impl: chunked" in captured.err
    assert "mqar_tokens" in stdout and "loss by position" in stdout and "results.json" in stdout
    res = json.loads((out / "results.json").read_text())
    (entry,) = res["models"].values()
    assert entry["meta"]["streamed"] and {c["task"] for c in entry["cells"]} == {"mqar_tokens", "passkey"}
    assert len(entry["perplexity_by_position"]) >= 2
    assert (out / "accuracy_vs_length.png").stat().st_size > 1000
    assert (out / "loss_by_position.png").stat().st_size > 1000

    missing_out = tmp_path / "missing_out"
    assert evaluate_main([str(tmp_path / "missing"), "--device", "cpu", "--output-dir", str(missing_out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing_out.exists()
    assert evaluate_main([str(ckpt), "--tasks", "nope", "--device", "cpu", "--output-dir", str(missing_out)]) == 2
    assert "unknown task" in capsys.readouterr().err
    # found before any model is loaded, not after the evaluation
    argv = [str(ckpt), "--tasks", "ppl", "--device", "cpu", "--no-progress"]
    assert evaluate_main(argv + ["--ppl-source", str(tmp_path / "nope.txt"), "--output-dir", str(missing_out)]) == 2
    err = capsys.readouterr().err
    assert "perplexity.source=" in err and "is not a file; use 'stdlib'" in err and "loading" not in err
    assert evaluate_main(argv + ["--output-dir", str(text)]) == 2
    err = capsys.readouterr().err
    assert "doc.txt' is a file; give a directory" in err and "loading" not in err


def test_mqar_training_batch_matches_the_eval_layout() -> None:
    spec = MQARTokenSpec()
    g = torch.Generator().manual_seed(0)
    n = torch.tensor([3, 5, 1])
    gaps = torch.tensor([10, 0, 40])
    ids, labels = mqar_batch(3, 64, n, gaps, spec, g, torch.device("cpu"))
    for r in range(3):
        row, lab = ids[r].tolist(), labels[r].tolist()
        k = int(n[r])
        q0 = 64 - 2 * k
        p0 = q0 - int(gaps[r]) - 2 * k
        pairs = {row[p0 + 2 * j]: row[p0 + 2 * j + 1] for j in range(k)}
        assert all(spec.key_range[0] <= key < spec.key_range[1] for key in pairs) and len(pairs) == k
        assert all(spec.noise_range[0] <= t < spec.noise_range[1] for t in row[:p0] + row[p0 + 2 * k : q0])
        queried = [row[q0 + 2 * j] for j in range(k)]
        assert sorted(queried) == sorted(pairs)
        for j in range(k):
            assert row[q0 + 2 * j + 1] == pairs[row[q0 + 2 * j]] == lab[q0 + 2 * j]
        assert sum(x != IGNORE_INDEX for x in lab) == k


def test_recall_experiment_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "recall"
    assert recall_main(["--quick", "--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "per-query recall" in stdout and "window" in stdout and "step" in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "done" and set(res["models"]) == {"window", "mag:titans"}
    for m in res["models"].values():
        assert m["train"]["steps"] > 0 and m["cells"]
        assert all(0.0 <= c["query_accuracy"] <= 1.0 for c in m["cells"])
    for f in ("recall_vs_distance.png", "recall_vs_pairs.png", "table.txt", "mag_titans/model.pt"):
        assert (out / f).is_file(), f


def test_recall_experiment_checks_eval_settings_and_records_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import olmo_miras_plugin.eval.recall_experiment as rx

    with pytest.raises(ValueError, match="eval_segment_len=0 must be >= 1"):
        RecallExperimentConfig.quick(eval_segment_len=0).validate()
    with pytest.raises(ValueError, match="device='foo'"):
        RecallExperimentConfig.quick(device="foo").validate()

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(rx, "evaluate_examples", broken)
    out = tmp_path / "crash"
    cfg = RecallExperimentConfig.quick(output_dir=str(out), steps=2, variants=parse_variants("mag:titans"))
    with pytest.raises(RuntimeError, match="evaluation broke"):
        rx.run_experiment(cfg, printer=lambda s: None)
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "failed" and saved["error"] == "RuntimeError: evaluation broke"
    assert (out / "mag_titans" / "model.pt").is_file()  # the trained model is kept


def test_recall_experiment_time_budget_and_interrupt(tmp_path: Path) -> None:
    import os
    import signal

    from olmo_miras_plugin.eval.recall_experiment import run_experiment

    # the time budget stops the memory model; the control then gets exactly as many steps
    cfg = RecallExperimentConfig.quick(
        output_dir=str(tmp_path / "budget"), steps=10**6, time_budget_s=3.0, control_budget_s=0.5,
        eval_reserve_s=0.5, log_every=1000,
    )
    res = run_experiment(cfg, printer=lambda s: None)
    mem, ctl = res["models"]["mag:titans"]["train"], res["models"]["window"]["train"]
    assert mem["stopped_by"] == "time budget" and 0 < mem["steps"] < 10**6
    assert ctl["steps"] == mem["steps"]
    assert res["seconds"] < 15

    # SIGINT mid-training: stop, evaluate what was trained, write results marked interrupted
    def printer(line: str) -> None:
        if "mag:titans step     2" in line:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "interrupted"
    cfg = RecallExperimentConfig.quick(output_dir=str(out), steps=50, log_every=1)
    before = signal.getsignal(signal.SIGINT)
    res = run_experiment(cfg, printer=printer)
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == res["status"] == "interrupted"
    assert saved["models"]["mag:titans"]["train"]["stopped_by"] == "signal"
    assert saved["models"]["mag:titans"]["cells"]
    assert "interrupted" in saved["models"]["window"]["error"]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_recall_experiment_falls_back_from_fused_memory_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from olmo_miras_plugin.eval.recall_experiment import run_experiment
    from olmo_miras_plugin.memory import MemoryImpl

    original = NeuralMemory.forward

    def flaky(self, x, state=None):  # the fused paths "fail" (e.g. no compiler on the machine)
        if MemoryImpl(self.impl) in (MemoryImpl.graphed, MemoryImpl.compiled):
            raise RuntimeError(f"no {self.impl} here")
        return original(self, x, state)

    monkeypatch.setattr(NeuralMemory, "forward", flaky)
    cfg = RecallExperimentConfig.quick(
        output_dir=str(tmp_path), memory_impl="graphed", variants=parse_variants("mag:titans"), steps=2
    )
    train = run_experiment(cfg, printer=lambda s: None)["models"]["mag:titans"]["train"]
    assert train["memory_impl"] == "chunked" and train["steps"] == 2
    assert "graphed failed" in train["note"] and "compiled failed" in train["note"]


def test_recall_experiment_keeps_its_recorded_step_sizes() -> None:
    """The recall task keeps the inner step sizes docs/results.md was measured with (the presets
    now start lower); ``theta_init`` / ``theta_max`` override them."""
    from olmo_miras_plugin.eval.recall_experiment import RECALL_STEP, build_model_config

    cfg = RecallExperimentConfig.quick()
    for spec in ("mag:titans", "mal:yaad"):
        variant = parse_variants(spec)[0]
        mem = build_model_config(cfg, variant).memory.neural_memory(cfg.d_model, 2)
        assert (mem.theta_init, mem.theta_max) == RECALL_STEP[variant.preset]
    cfg.theta_init, cfg.theta_max = 0.002, 0.02
    mem = build_model_config(cfg, parse_variants("mag:titans")[0]).memory.neural_memory(cfg.d_model, 2)
    assert (mem.theta_init, mem.theta_max) == (0.002, 0.02)
