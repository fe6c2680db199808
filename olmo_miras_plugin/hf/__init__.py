"""Hugging Face ``transformers`` export of olmo-miras models, and back.

- ``configuration_olmo_miras.py`` / ``modeling_olmo_miras.py``: the HF config and model, copied
  into every exported directory (``trust_remote_code``); the base is transformers' own OLMo2 /
  OLMo3 code, the memory olmo-miras' modules.
- ``convert.py``: OLMo-core ⇄ HF conversion (``convert_to_hf``, ``convert_from_hf``).
- ``checkpoint.py``: reading OLMo-core checkpoints on CPU without unpickling untrusted data.

Importing this package also registers the classes with ``AutoConfig`` / ``AutoModelForCausalLM``,
so exported directories load without ``trust_remote_code`` in a process that has imported it.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .checkpoint import CheckpointError
from .configuration_olmo_miras import OlmoMirasConfig
from .convert import (
    ConversionError,
    convert_from_hf,
    convert_to_hf,
    hf_config_from_miras,
    hf_to_olmo_core_state,
    load_hf_state,
    load_miras_checkpoint,
    load_olmo_core_model,
    olmo_core_to_hf_state,
    save_byte_tokenizer,
    validate_hf_model,
)
from .modeling_olmo_miras import MirasCache, OlmoMirasForCausalLM, OlmoMirasModel

try:
    AutoConfig.register(OlmoMirasConfig.model_type, OlmoMirasConfig)
    AutoModelForCausalLM.register(OlmoMirasConfig, OlmoMirasForCausalLM)
except ValueError:  # already registered (module reloaded)
    pass
# save_pretrained() of these classes then copies their code files next to the weights and keeps
# auto_map, so a re-saved model still loads with trust_remote_code.
OlmoMirasConfig.register_for_auto_class("AutoConfig")
OlmoMirasForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "CheckpointError",
    "ConversionError",
    "MirasCache",
    "OlmoMirasConfig",
    "OlmoMirasForCausalLM",
    "OlmoMirasModel",
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
