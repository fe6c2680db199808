"""OLMo-core ⇄ Hugging Face conversion of olmo-miras models.

OLMo-core → HF (:func:`convert_to_hf`):

1. The checkpoint: an in-memory model (OLMo-core ``Transformer``) or state dict + its
   ``MirasModelConfig``, or an OLMo-core checkpoint directory (a ``stepN`` directory with
   ``model_and_optim/`` and ``config.json``, or the ``model_and_optim`` directory itself), read on
   CPU in one process with :mod:`.checkpoint` (no unpickling of untrusted data).
2. The base: OLMo-core's own conversion (``olmo_core.nn.hf``): ``get_hf_config`` makes the
   ``Olmo2Config`` / ``Olmo3Config`` (sliding window, RoPE, norms) and ``convert_state_to_hf``
   renames the base parameters to transformers' names.
3. The memory: ``blocks.{i}.attention.miras.<rest>`` → ``model.layers.{i}.miras.<rest>``.
4. The directory: ``config.json`` (:class:`~.configuration_olmo_miras.OlmoMirasConfig`, with
   ``auto_map``), ``model.safetensors`` (sharded above 5 GB), ``generation_config.json``, the
   modeling/configuration code, and the tokenizer when the checkpoint has one (or the byte
   tokenizer for checkpoints trained with it).
5. Validation (default on): the exported HF model and the OLMo-core model give the same logits.

HF → OLMo-core (:func:`convert_from_hf`): the reverse renaming (OLMo-core's
``convert_state_from_hf`` for the base), loaded strictly into the OLMo-core model, saved as an
OLMo-core checkpoint (``model_and_optim/``, what ``--pretrained.path`` / ``trainer.load_path``
read) with ``config.json`` holding the ``MirasModelConfig`` under ``"model"``, the tokenizer
config under ``"tokenizer"`` and the HF-only settings (``max_position_embeddings``,
``prefill_chunk_size``) under ``"hf"``, so converting back restores them. Weights are read with
safetensors only.
"""

from __future__ import annotations

import json
import logging
import numbers
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..atomic_files import write_text_atomic
from ..models import MirasModelConfig, is_memory_param, upgrade_saved_config
from .checkpoint import CheckpointError, read_model_state
from .configuration_olmo_miras import BASE_MODEL_TYPES, OlmoMirasConfig, check_config_classes

__all__ = [
    "ConversionError",
    "LoadedCheckpoint",
    "convert_from_hf",
    "convert_to_hf",
    "hf_config_from_miras",
    "hf_to_olmo_core_state",
    "load_hf_state",
    "load_miras_checkpoint",
    "load_olmo_core_model",
    "olmo_core_to_hf_state",
    "save_byte_tokenizer",
    "validate_hf_model",
]

log = logging.getLogger(__name__)

MIRAS_CONFIG_CLASS = "olmo_miras_plugin.models.MirasModelConfig"
BYTE_TOKENIZER_ID = "olmo-miras/bytes"
CODE_FILES = ("configuration_olmo_miras.py", "modeling_olmo_miras.py")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)

_OC_MEMORY_KEY = re.compile(r"^blocks\.(\d+)\.attention\.miras\.(.+)$")
_HF_MEMORY_KEY = re.compile(r"^model\.layers\.(\d+)\.miras\.(.+)$")


class ConversionError(ValueError):
    """The input can't be converted (not a MIRAS model, incomplete, inconsistent); the message says why."""


# ---------------------------------------------------------------------------------------------- checkpoints
@dataclass
class LoadedCheckpoint:
    """An OLMo-core MIRAS checkpoint in memory."""

    config: MirasModelConfig
    state: Dict[str, torch.Tensor]
    experiment: Dict[str, Any] = field(default_factory=dict)
    """The full config.json (experiment config) when read from a directory."""
    path: Optional[Path] = None
    """The step directory (holding ``model_and_optim/``), when read from disk."""

    def tokenizer_config(self) -> Optional[Dict[str, Any]]:
        """The OLMo-core ``TokenizerConfig`` dict the model was trained with, if recorded."""
        tok = self.experiment.get("tokenizer")
        if not isinstance(tok, dict):
            tok = (self.experiment.get("dataset") or {}).get("tokenizer")
        return tok if isinstance(tok, dict) else None

    def sequence_length(self) -> Optional[int]:
        tm = self.experiment.get("train_module") or {}
        ds = self.experiment.get("dataset") or {}
        for v in (tm.get("max_sequence_length"), ds.get("sequence_length")):
            if isinstance(v, int) and v > 0:
                return v
        return None

    def segment_length(self) -> Optional[int]:
        v = (self.experiment.get("train_module") or {}).get("segment_length")
        return v if isinstance(v, int) and v > 0 else None

    def _hf_setting(self, name: str) -> Optional[int]:
        v = (self.experiment.get("hf") or {}).get(name)
        return v if isinstance(v, int) and v > 0 else None

    def max_position_embeddings(self) -> Optional[int]:
        """The HF ``max_position_embeddings`` to export with: the one recorded by
        :func:`convert_from_hf`, else the training sequence length."""
        return self._hf_setting("max_position_embeddings") or self.sequence_length()

    def prefill_chunk_size(self) -> Optional[int]:
        """``generate()``'s default prompt segment: the one recorded by :func:`convert_from_hf` (a
        model that came from HF keeps what it had, none included), else the training segment or
        sequence length."""
        if isinstance(self.experiment.get("hf"), dict):
            return self._hf_setting("prefill_chunk_size")
        return self.segment_length() or self.sequence_length()


def _check_size(name: str, value: Any) -> Optional[int]:
    """``None`` (the default) or an integer > 0: a size <= 0 would be written into the export and
    only fail later, in ``generate()``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer (or None for the default), got {value!r}")
    return int(value)


def miras_config_from_dict(model_dict: Any, where: str) -> MirasModelConfig:
    """A ``MirasModelConfig`` from its config dict, refusing anything that isn't one."""
    if not isinstance(model_dict, dict):
        raise ConversionError(f"{where}: no model config found")
    cls = model_dict.get("_CLASS_")
    if cls != MIRAS_CONFIG_CLASS:
        if isinstance(cls, str) and cls.endswith("TransformerConfig"):
            raise ConversionError(
                f"{where}: not a MIRAS model: the model is a plain OLMo-core {cls.rsplit('.', 1)[-1]} (no memory "
                "layers); convert it with OLMo-core's own converter (olmo_core.nn.hf.convert_checkpoint_to_hf)"
            )
        raise ConversionError(
            f"{where}: not a MIRAS model: the model config class is {cls!r}, expected {MIRAS_CONFIG_CLASS}"
        )
    try:
        check_config_classes(model_dict, where)
        return MirasModelConfig.from_dict(upgrade_saved_config(model_dict))
    except Exception as e:
        raise ConversionError(f"{where}: invalid MirasModelConfig: {e}") from e


def _find_checkpoint_dirs(path: Path) -> Tuple[Path, Path]:
    """``(step dir with config.json, model_and_optim dir)`` for a step dir or its model_and_optim."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} doesn't exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    if (path / "model_and_optim").is_dir():
        return path, path / "model_and_optim"
    if (path / ".metadata").is_file():
        return path.parent if (path.parent / "config.json").is_file() else path, path
    raise CheckpointError(
        f"{path} is not an OLMo-core checkpoint: expected {path}/model_and_optim/ (a step directory) or "
        f"{path}/.metadata (a model_and_optim directory)"
    )


def load_miras_checkpoint(path: Union[str, Path]) -> LoadedCheckpoint:
    """Read an OLMo-core MIRAS checkpoint directory (see the module docstring) on CPU.

    Raises :class:`ConversionError` / :class:`~.checkpoint.CheckpointError` with what is wrong:
    not a MIRAS model, missing config.json, missing or truncated data files, parameters missing
    from or unexpected in the checkpoint, wrong shapes.
    """
    step_dir, mo_dir = _find_checkpoint_dirs(Path(path))
    cfg_path = step_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"no config.json next to the checkpoint ({cfg_path}): it holds the model config (OLMo-core's "
            "ConfigSaverCallback writes it); can't tell which model the weights belong to"
        )
    try:
        experiment = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(experiment, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object")
    model_dict = experiment.get("model", experiment if experiment.get("_CLASS_") else None)
    config = miras_config_from_dict(model_dict, str(cfg_path))
    state = read_model_state(mo_dir)
    check_state_matches(config, state, where=str(mo_dir))
    return LoadedCheckpoint(config=config, state=state, experiment=experiment, path=step_dir)


def _expected_shapes(config: MirasModelConfig) -> Dict[str, Tuple[int, ...]]:
    model = config.build(init_device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_matches(config: MirasModelConfig, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Names and shapes of ``state`` are exactly those of the model ``config`` builds."""
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems: List[str] = []
    if missing:
        what = "memory " if all(is_memory_param(k) for k in missing) else ""
        problems.append(f"{len(missing)} {what}parameter(s) missing: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected parameter(s): {_some(unexpected)}")
    bad = [
        f"{k}: {tuple(state[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es): {_some(bad)}")
    if problems:
        hint = ""
        if missing and not unexpected and all(is_memory_param(k) for k in missing) and len(missing) == sum(
            is_memory_param(k) for k in expected
        ):
            hint = " (it has no memory parameters at all: a base OLMo checkpoint, not a trained MIRAS model)"
        raise ConversionError(f"{where} doesn't match its model config{hint}:\n  - " + "\n  - ".join(problems))


def _some(items: List[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_olmo_core_model(path: Union[str, Path], device: str = "cpu") -> Tuple[nn.Module, LoadedCheckpoint]:
    """The OLMo-core model of a MIRAS checkpoint directory, weights loaded, in eval mode."""
    ckpt = load_miras_checkpoint(path)
    model = ckpt.config.build(init_device="meta")
    model.to_empty(device=device)
    model.load_state_dict(ckpt.state, strict=True)
    return model.eval(), ckpt


# ---------------------------------------------------------------------------------------------- configs
def _check_exportable(config: MirasModelConfig) -> None:
    """HF OLMo2/OLMo3 layers are reordered-norm blocks with QK-norm over all heads, no biases."""
    tc = config.transformer_config()
    for i, block in enumerate(tc.resolved_block_configs):
        att = block.sequence_mixer
        where = f"layer {i}"
        if str(block.name) != "reordered_norm":
            raise ConversionError(
                f"{where}: block type {block.name!r} has no Hugging Face OLMo2/OLMo3 equivalent "
                "(their layers are 'reordered_norm' blocks)"
            )
        if getattr(att, "qk_norm", None) is None or getattr(att, "use_head_qk_norm", False):
            raise ConversionError(f"{where}: HF OLMo2/OLMo3 attention needs QK-norm over all heads (qk_norm set, use_head_qk_norm=False)")
        if getattr(att, "bias", False) or getattr(att, "clip_qkv", None) is not None:
            raise ConversionError(f"{where}: attention biases / clip_qkv have no HF OLMo2/OLMo3 equivalent")
        if getattr(att, "rope", None) is None:
            raise ConversionError(f"{where}: HF OLMo2/OLMo3 attention needs RoPE")


def hf_config_from_miras(
    config: MirasModelConfig,
    *,
    max_position_embeddings: Optional[int] = None,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    miras_tokenizer: Optional[str] = None,
) -> OlmoMirasConfig:
    """The :class:`OlmoMirasConfig` of a ``MirasModelConfig``: OLMo-core's ``get_hf_config`` of the
    built model (on the meta device) for the base, plus the memory config."""
    from olmo_core.nn.hf.config import get_hf_config

    _check_exportable(config)
    model = config.build(init_device="meta")
    try:
        base = get_hf_config(model)
    except (NotImplementedError, ValueError, RuntimeError) as e:
        raise ConversionError(f"the base can't be expressed as an HF OLMo2/OLMo3 config: {e}") from e
    base_type = base.model_type
    if base_type not in BASE_MODEL_TYPES:
        raise ConversionError(f"unexpected HF base type {base_type!r} (expected {', '.join(BASE_MODEL_TYPES)})")
    fields = {k: v for k, v in base.to_dict().items() if k not in ("model_type", "transformers_version", "architectures")}
    first = next(iter(model.blocks.values()))
    fields["head_dim"] = first.attention.head_dim
    fields["max_position_embeddings"] = _check_size("max_position_embeddings", max_position_embeddings) or 65536
    for name, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        fields[name] = value
    hf = OlmoMirasConfig(
        base_model_type=base_type,
        miras_config=config.as_config_dict(),
        miras_tokenizer=miras_tokenizer,
        **fields,
    )
    hf.architectures = ["OlmoMirasForCausalLM"]
    hf.auto_map = {
        "AutoConfig": "configuration_olmo_miras.OlmoMirasConfig",
        "AutoModelForCausalLM": "modeling_olmo_miras.OlmoMirasForCausalLM",
    }
    return hf


# ---------------------------------------------------------------------------------------------- states
def olmo_core_to_hf_state(hf_config: OlmoMirasConfig, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """OLMo-core names → HF names: base by OLMo-core's ``convert_state_to_hf``, memory
    ``blocks.{i}.attention.miras.X`` → ``model.layers.{i}.miras.X``."""
    from olmo_core.nn.hf.convert import convert_state_to_hf

    base, out = {}, {}
    for k, v in state.items():
        m = _OC_MEMORY_KEY.match(k)
        if m:
            out[f"model.layers.{m.group(1)}.miras.{m.group(2)}"] = v
        elif is_memory_param(k):
            raise ConversionError(f"memory parameter {k!r} is outside blocks.<i>.attention.miras.")
        else:
            base[k] = v
    try:
        out.update(convert_state_to_hf(hf_config.to_base_config(), base))
    except RuntimeError as e:
        raise ConversionError(f"base parameters without an HF OLMo2/OLMo3 equivalent: {e}") from e
    return out


def hf_to_olmo_core_state(hf_config: OlmoMirasConfig, hf_state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`olmo_core_to_hf_state` (base by OLMo-core's ``convert_state_from_hf``)."""
    from olmo_core.nn.hf.convert import convert_state_from_hf

    base, out = {}, {}
    for k, v in hf_state.items():
        m = _HF_MEMORY_KEY.match(k)
        if m:
            out[f"blocks.{m.group(1)}.attention.miras.{m.group(2)}"] = v
        else:
            base[k] = v
    try:
        out.update(convert_state_from_hf(hf_config.to_base_config(), base, model_type=hf_config.base_model_type))
    except RuntimeError as e:
        raise ConversionError(f"HF weights that don't map to OLMo-core: {e}") from e
    return out


# ---------------------------------------------------------------------------------------------- tokenizers
def _tokenizer_source(ckpt: LoadedCheckpoint, explicit: Optional[Union[str, Path]]) -> Optional[Path]:
    """Where the checkpoint's tokenizer files are: ``explicit``, ``<ckpt>/tokenizer/``, ``<ckpt>/``,
    or ``<ckpt>/../tokenizer/`` (OLMo-core's convention)."""
    if explicit is not None:
        p = Path(explicit)
        if not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
            raise ConversionError(f"--tokenizer {p}: no tokenizer.json there")
        return p
    if ckpt.path is None:
        return None
    for p in (ckpt.path / "tokenizer", ckpt.path, ckpt.path.parent / "tokenizer"):
        if (p / "tokenizer.json").is_file():
            return p
    return None


def save_byte_tokenizer(out_dir: Union[str, Path]) -> Any:
    """Write an HF fast tokenizer equal to :class:`~olmo_miras_plugin.tokenizer.ByteTokenizer`
    (ids 0–255 = UTF-8 bytes, 256 EOS, 257 PAD, 258 BOS), so ``AutoTokenizer`` works on tiny models."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    from ..tokenizer import ByteTokenizer

    # GPT-2's printable stand-in for every byte (what the ByteLevel pre-tokenizer emits).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    bt = ByteTokenizer()
    specials = {bt.eos_token_id: "<|endoftext|>", bt.pad_token_id: "<|pad|>", bt.bos_token_id: "<|bos|>"}
    tok.add_special_tokens([specials[i] for i in sorted(specials)])
    for i, s in specials.items():
        assert tok.token_to_id(s) == i, (s, i)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=specials[bt.eos_token_id],
        pad_token=specials[bt.pad_token_id],
        bos_token=specials[bt.bos_token_id],
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def _copy_tokenizer(src: Path, out_dir: Path) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------------------------- OLMo-core → HF
def _check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Before any work: the output must be a directory (or not exist yet), empty unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a directory (remove it or choose another path)")
    if out_dir.is_dir() and not overwrite and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")


def _prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    _check_output_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)


def convert_to_hf(
    source: Union[str, Path, nn.Module, Mapping[str, torch.Tensor]],
    out_dir: Union[str, Path],
    *,
    config: Optional[MirasModelConfig] = None,
    dtype: Optional[torch.dtype] = None,
    tokenizer: Optional[Union[str, Path]] = None,
    tokenizer_config: Optional[Any] = None,
    max_position_embeddings: Optional[int] = None,
    prefill_chunk_size: Optional[int] = None,
    validate: bool = True,
    overwrite: bool = False,
) -> OlmoMirasConfig:
    """Write an HF model directory for an OLMo-core MIRAS model (see the module docstring).

    :param source: an OLMo-core checkpoint directory, or an OLMo-core model / state dict (then
        ``config`` is required).
    :param dtype: cast every weight (default: keep the checkpoint's).
    :param tokenizer: a directory with ``tokenizer.json`` to include (default: the checkpoint's, if any).
    :param tokenizer_config: for an in-memory model, the OLMo-core ``TokenizerConfig`` (or its dict)
        it was trained with (special token ids; the byte tokenizer's is exported as files).
    :param max_position_embeddings: > 0; default: the one recorded by :func:`convert_from_hf`, else
        the training sequence length, else 65536.
    :param prefill_chunk_size: ``generate()``'s default prompt segment (memory written as it goes),
        > 0; default: the one recorded by :func:`convert_from_hf`, else the training segment or
        sequence length.
    :param validate: load the result with transformers and compare logits with the OLMo-core model.
    """
    out_dir = Path(out_dir)
    max_position_embeddings = _check_size("max_position_embeddings", max_position_embeddings)
    prefill_chunk_size = _check_size("prefill_chunk_size", prefill_chunk_size)
    _check_output_dir(out_dir, overwrite)
    if isinstance(source, (str, Path)):
        if config is not None or tokenizer_config is not None:
            raise ValueError("config and tokenizer_config are read from the checkpoint directory; don't pass them")
        ckpt = load_miras_checkpoint(source)
    else:
        if config is None:
            raise ValueError("converting an in-memory model / state dict needs its MirasModelConfig (config=...)")
        if not isinstance(config, MirasModelConfig):
            raise ConversionError(f"not a MIRAS model: config is a {type(config).__name__}, not a MirasModelConfig")
        state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
        state = {k: v.detach().to("cpu") for k, v in state.items()}
        check_state_matches(config, state, where="the given model")
        experiment: Dict[str, Any] = {}
        if tokenizer_config is not None:
            tc = tokenizer_config if isinstance(tokenizer_config, dict) else tokenizer_config.as_config_dict()
            experiment["tokenizer"] = tc
        ckpt = LoadedCheckpoint(config=config, state=state, experiment=experiment)
    src = _tokenizer_source(ckpt, tokenizer)
    _prepare_output_dir(out_dir, overwrite)

    tok_cfg = ckpt.tokenizer_config() or {}
    identifier = tok_cfg.get("identifier")
    hf_config = hf_config_from_miras(
        ckpt.config,
        max_position_embeddings=max_position_embeddings or ckpt.max_position_embeddings(),
        bos_token_id=tok_cfg.get("bos_token_id"),
        eos_token_id=tok_cfg.get("eos_token_id"),
        pad_token_id=tok_cfg.get("pad_token_id"),
        miras_tokenizer=identifier,
    )
    state = ckpt.state if dtype is None else {k: v.to(dtype) for k, v in ckpt.state.items()}
    if dtype is not None:
        hf_config.dtype = dtype
    hf_state = olmo_core_to_hf_state(hf_config, state)
    del state
    if not validate:
        ckpt.state = {}  # only the converted copy is needed from here: halves peak memory on big models
    _write_hf_dir(out_dir, hf_config, hf_state, prefill_chunk_size or ckpt.prefill_chunk_size())
    del hf_state

    if src is not None:
        log.info("tokenizer files from %s: %s", src, ", ".join(_copy_tokenizer(src, out_dir)))
    elif identifier == BYTE_TOKENIZER_ID:
        save_byte_tokenizer(out_dir)
    elif ckpt.path is not None:
        log.warning(
            "no tokenizer files found for the checkpoint (tokenizer %r); the HF directory has none: "
            "pass tokenizer=<dir with tokenizer.json> to include one",
            identifier,
        )
    if validate:
        validate_hf_model(out_dir, ckpt.config, ckpt.state, dtype=dtype)
    return hf_config


def _write_hf_dir(
    out_dir: Path, hf_config: OlmoMirasConfig, hf_state: Dict[str, torch.Tensor], prefill_chunk_size: Optional[int]
) -> None:
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    hf_config.save_pretrained(str(out_dir))
    # Tied embeddings share storage: write each tensor once, as transformers does.
    shared = ["lm_head.weight"] if getattr(hf_config, "tie_word_embeddings", False) else None
    save_torch_state_dict(
        {k: v.contiguous() for k, v in hf_state.items()},
        str(out_dir),
        metadata={"format": "pt"},
        shared_tensors_to_discard=shared,
    )
    gen = GenerationConfig(
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=hf_config.eos_token_id,
        pad_token_id=hf_config.pad_token_id,
    )
    if prefill_chunk_size:
        gen.prefill_chunk_size = int(prefill_chunk_size)
    gen.save_pretrained(str(out_dir))
    here = Path(__file__).resolve().parent
    for name in CODE_FILES:
        shutil.copyfile(here / name, out_dir / name)


@torch.no_grad()
def validate_hf_model(
    hf_dir: Union[str, Path],
    config: MirasModelConfig,
    state: Mapping[str, torch.Tensor],
    *,
    dtype: Optional[torch.dtype] = None,
    length: Optional[int] = None,
    seed: int = 0,
) -> float:
    """Load ``hf_dir`` with transformers and compare its logits with the OLMo-core model's on random
    tokens (long enough to cross memory chunks); returns the max relative difference."""
    from .modeling_olmo_miras import OlmoMirasForCausalLM

    hf = OlmoMirasForCausalLM.from_pretrained(str(hf_dir), dtype=dtype or torch.float32).eval()
    oc = config.build(init_device="meta")
    oc.to_empty(device="cpu")
    oc.load_state_dict(dict(state), strict=True)
    oc = oc.to(dtype=dtype or torch.float32).eval()
    if length is None:
        chunk = max(
            [getattr(m, "chunk_size", 0) for m in oc.modules() if hasattr(m, "chunk_size") and isinstance(m.chunk_size, int)]
            or [64]
        )
        length = min(2 * chunk + 3, 512)
    ids = torch.randint(0, config.base.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    a = hf(ids, use_cache=False).logits.float()
    b = oc(ids).float()
    rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    tol = 1e-4 if (dtype or torch.float32) == torch.float32 else 5e-2
    if not rel <= tol:
        raise ConversionError(f"validation failed: HF and OLMo-core logits differ (max relative difference {rel:.3g} > {tol})")
    log.info("validation: HF and OLMo-core logits agree (max relative difference %.3g)", rel)
    return rel


# ---------------------------------------------------------------------------------------------- HF → OLMo-core
def load_hf_state(hf_dir: Union[str, Path]) -> Tuple[OlmoMirasConfig, Dict[str, torch.Tensor]]:
    """Config and weights of an HF olmo-miras directory, weights read with safetensors only."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ConversionError(f"{cfg_path} is not valid JSON: {e}") from e
    model_type = raw.get("model_type")
    if model_type != OlmoMirasConfig.model_type:
        hint = ""
        if model_type in BASE_MODEL_TYPES:
            hint = (
                "; a plain OLMo checkpoint has no memory: start training from it with "
                "--pretrained.path=<dir> --pretrained.format=hf instead"
            )
        raise ConversionError(
            f"not a MIRAS model: {cfg_path} has model_type {model_type!r}, expected {OlmoMirasConfig.model_type!r}{hint}"
        )
    raw.pop("model_type", None)
    hf_config = OlmoMirasConfig.from_dict(raw)
    if not isinstance(hf_config.miras_config, dict):
        raise ConversionError(f"{cfg_path} has no miras_config (the OLMo-core model config)")

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConversionError(f"{index} is not a valid safetensors index: {e}") from e
        files = sorted(set(weight_map.values()))
    elif (hf_dir / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        pickled = [p.name for p in hf_dir.glob("*.bin")] + [p.name for p in hf_dir.glob("*.pt")]
        extra = (
            f" ({', '.join(pickled)} are pickle files, which are never loaded here: re-save the model with "
            "save_pretrained(safe_serialization=True))"
            if pickled
            else ""
        )
        raise ConversionError(f"{hf_dir} has no safetensors weights (model.safetensors){extra}")
    state: Dict[str, torch.Tensor] = {}
    for name in files:
        p = hf_dir / name
        if Path(name).name != name or not p.is_file():
            raise ConversionError(f"incomplete HF model: weight file {p} is missing")
        try:
            state.update(load_file(str(p)))
        except Exception as e:
            raise ConversionError(f"weight file {p} is corrupted: {e}") from e
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ConversionError(f"incomplete HF model: {len(missing)} tensor(s) listed in {index.name} not found: {_some(missing)}")
    return hf_config, state


def convert_from_hf(
    hf_dir: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    overwrite: bool = False,
) -> MirasModelConfig:
    """Write an OLMo-core checkpoint (``out_dir/model_and_optim`` + ``out_dir/config.json``, and
    ``out_dir/tokenizer/`` when the HF directory has tokenizer files) for an HF olmo-miras model.
    Train from it with ``--pretrained.path=out_dir`` (or ``trainer.load_path``)."""
    from olmo_core.distributed.checkpoint import save_model_and_optim_state

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _check_output_dir(out_dir, overwrite)
    hf_config, hf_state = load_hf_state(hf_dir)
    config = miras_config_from_dict(hf_config.miras_config, f"{hf_dir}/config.json miras_config")
    if hf_state and "lm_head.weight" not in hf_state and getattr(hf_config, "tie_word_embeddings", False):
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]
    state = hf_to_olmo_core_state(hf_config, hf_state)
    del hf_state
    check_state_matches(config, state, where=f"{hf_dir} (converted to OLMo-core names)")
    _prepare_output_dir(out_dir, overwrite)

    # Built on the meta device and given the converted tensors themselves (no second copy).
    model = config.build(init_device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    mo = out_dir / "model_and_optim"
    if mo.exists():
        shutil.rmtree(mo)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        save_model_and_optim_state(str(mo), model)

    experiment: Dict[str, Any] = {"model": config.as_config_dict()}
    tok = _tokenizer_config_from_hf(hf_config)
    if tok is not None:
        experiment["tokenizer"] = tok
    # Not part of the OLMo-core model: kept so that convert_to_hf gives them back.
    experiment["hf"] = _hf_settings(hf_dir, hf_config)
    write_text_atomic(out_dir / "config.json", json.dumps(experiment, indent=2) + "\n")
    if (hf_dir / "tokenizer.json").is_file():
        (out_dir / "tokenizer").mkdir(exist_ok=True)
        _copy_tokenizer(hf_dir, out_dir / "tokenizer")
    return config


def _hf_settings(hf_dir: Path, hf_config: OlmoMirasConfig) -> Dict[str, int]:
    """``max_position_embeddings`` (config.json) and ``prefill_chunk_size`` (generation_config.json)
    of an HF directory, where set to a positive integer."""
    prefill = None
    gen_path = hf_dir / "generation_config.json"
    if gen_path.is_file():
        try:
            gen = json.loads(gen_path.read_text())
        except (OSError, ValueError) as e:
            raise ConversionError(f"{gen_path} is not valid JSON: {e}") from e
        prefill = gen.get("prefill_chunk_size") if isinstance(gen, dict) else None
    out = {}
    for name, v in (("max_position_embeddings", getattr(hf_config, "max_position_embeddings", None)), ("prefill_chunk_size", prefill)):
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out[name] = v
    return out


def _tokenizer_config_from_hf(hf_config: OlmoMirasConfig) -> Optional[Dict[str, Any]]:
    """The OLMo-core ``TokenizerConfig`` dict of the byte tokenizer, when the HF config says the model
    uses it (other tokenizers travel as files in ``tokenizer/``)."""
    if getattr(hf_config, "miras_tokenizer", None) != BYTE_TOKENIZER_ID:
        return None
    from ..tokenizer import byte_tokenizer_config

    return byte_tokenizer_config().as_config_dict()
