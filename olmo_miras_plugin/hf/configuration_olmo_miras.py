"""Hugging Face config of an olmo-miras model: an OLMo2/OLMo3 base plus Titans/MIRAS memory layers.

This file is copied next to the weights of every exported model (``auto_map`` in config.json
points at it), so it imports nothing but ``transformers``: ``AutoConfig`` works even where the
``olmo-miras`` package isn't installed (the model itself needs it, see ``modeling_olmo_miras.py``).

Layout of the config, and why:

- The base's own fields (``hidden_size``, ``num_hidden_layers``, ``layer_types``,
  ``sliding_window``, ``rope_parameters``, ...) sit at the top level, exactly as in the
  ``Olmo2Config`` / ``Olmo3Config`` of the same base. transformers' decoder layers, rotary
  embedding, mask functions and caches read these attributes straight from the config object,
  and :meth:`OlmoMirasConfig.to_base_config` rebuilds the plain base config from them.
- ``base_model_type`` (``"olmo2"`` or ``"olmo3"``) says which transformers modules build the base.
- ``miras_config`` is the OLMo-core :class:`~olmo_miras_plugin.models.MirasModelConfig`, as its
  config dict. It is the single source of truth for the memory (which layers, block type,
  preset, sizes), resolved by the same code OLMo-core uses, and converting back to OLMo-core is a
  plain ``MirasModelConfig.from_dict`` of it.
- ``miras_tokenizer`` optionally names the tokenizer the model was trained with
  (``"olmo-miras/bytes"`` for the byte tokenizer of the tiny models).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple

from transformers import PretrainedConfig

__all__ = ["OlmoMirasConfig", "BASE_MODEL_TYPES", "ALLOWED_CLASS_PREFIXES"]

BASE_MODEL_TYPES: Tuple[str, ...] = ("olmo2", "olmo3")

ALLOWED_CLASS_PREFIXES: Tuple[str, ...] = ("olmo_core.", "olmo_miras_plugin.")
"""``miras_config`` names config classes (``_CLASS_``) that OLMo-core's ``Config.from_dict``
imports and instantiates; only these packages' classes are accepted, so a config.json can't make
us import arbitrary modules."""

# Keys that belong to this wrapper or to HF bookkeeping, not to the base config.
_NON_BASE_KEYS = frozenset(
    {
        "model_type",
        "architectures",
        "auto_map",
        "transformers_version",
        "base_model_type",
        "miras_config",
        "miras_tokenizer",
        "_name_or_path",
        "_attn_implementation_autoset",
        "dtype",
        "torch_dtype",
    }
)


def check_config_classes(value: Any, where: str = "miras_config") -> None:
    """Raise ``ValueError`` if a (nested) config dict names a class outside :data:`ALLOWED_CLASS_PREFIXES`."""
    if isinstance(value, dict):
        cls = value.get("_CLASS_")
        if cls is not None and (not isinstance(cls, str) or not cls.startswith(ALLOWED_CLASS_PREFIXES)):
            raise ValueError(
                f"{where}: refusing config class {cls!r}; only classes from "
                f"{', '.join(p.rstrip('.') for p in ALLOWED_CLASS_PREFIXES)} are allowed"
            )
        for k, v in value.items():
            check_config_classes(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_config_classes(v, f"{where}[{i}]")


class OlmoMirasConfig(PretrainedConfig):
    """See the module docstring. Build one with
    :func:`olmo_miras_plugin.hf.convert.hf_config_from_miras` rather than by hand."""

    model_type = "olmo_miras"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        base_model_type: str = "olmo2",
        miras_config: Optional[Dict[str, Any]] = None,
        miras_tokenizer: Optional[str] = None,
        **kwargs: Any,
    ):
        if base_model_type not in BASE_MODEL_TYPES:
            raise ValueError(
                f"unknown base_model_type {base_model_type!r}; valid: {', '.join(BASE_MODEL_TYPES)}"
            )
        self.base_model_type = base_model_type
        self.miras_config = copy.deepcopy(miras_config) if miras_config is not None else None
        self.miras_tokenizer = miras_tokenizer
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ the base
    def base_config_dict(self) -> Dict[str, Any]:
        """The fields of the plain ``Olmo2Config`` / ``Olmo3Config`` of this model's base."""
        return {k: copy.deepcopy(v) for k, v in self.to_dict().items() if k not in _NON_BASE_KEYS}

    def to_base_config(self) -> PretrainedConfig:
        """The plain transformers config of the base (``Olmo2Config`` / ``Olmo3Config``): what
        ``Olmo2ForCausalLM`` / ``Olmo3ForCausalLM`` need to hold the same base weights."""
        if self.base_model_type == "olmo2":
            from transformers import Olmo2Config as cls
        else:
            from transformers import Olmo3Config as cls  # type: ignore[no-redef]
        base = cls(**self.base_config_dict())
        impl = getattr(self, "_attn_implementation", None)
        if impl is not None:
            base._attn_implementation = impl
        return base

    def resolved_layer_types(self) -> list:
        """``layer_types`` of the base (OLMo2: every layer ``full_attention``)."""
        types = getattr(self, "layer_types", None)
        if types is None:
            return ["full_attention"] * int(self.num_hidden_layers)
        return list(types)

    # ------------------------------------------------------------------ the memory
    def miras_model_config(self) -> Any:
        """The OLMo-core ``MirasModelConfig`` (needs the ``olmo-miras`` package)."""
        if not isinstance(self.miras_config, dict):
            raise ValueError(
                "this config has no miras_config (the OLMo-core MirasModelConfig of the model); "
                "it was not written by olmo-miras' converter"
            )
        check_config_classes(self.miras_config)
        from olmo_miras_plugin.models import MirasModelConfig, upgrade_saved_config

        return MirasModelConfig.from_dict(upgrade_saved_config(self.miras_config))
