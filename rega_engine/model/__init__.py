"""Llama-family model code (single device) and Hugging Face checkpoint I/O."""
from rega_engine.model.hf_io import (CheckpointError, from_pretrained, load_state_dict_into,
                                     save_pretrained)
from rega_engine.model.llama import (CausalLM, CausalLMOutput, ConfigError, ModelArgs,
                                     SUPPORTED_MODEL_TYPES, from_config)

__all__ = ["CausalLM", "CausalLMOutput", "CheckpointError", "ConfigError", "ModelArgs",
           "SUPPORTED_MODEL_TYPES", "from_config", "from_pretrained", "load_state_dict_into",
           "save_pretrained"]
