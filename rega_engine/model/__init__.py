"""Llama-family model code (single device), its arguments, and Hugging Face checkpoint I/O.

args.py: ModelArgs and the parsing of a config.json; llama.py: the model; hf_io.py: safetensors
in and out, and the export of a trained run.
"""
from rega_engine.errors import CheckpointError, ConfigError
from rega_engine.model.args import SUPPORTED_MODEL_TYPES, ModelArgs, RopeArgs
from rega_engine.model.hf_io import from_pretrained, load_state_dict_into, save_pretrained
from rega_engine.model.llama import CausalLM, CausalLMOutput, from_config

__all__ = ["CausalLM", "CausalLMOutput", "CheckpointError", "ConfigError", "ModelArgs",
           "RopeArgs", "SUPPORTED_MODEL_TYPES", "from_config", "from_pretrained",
           "load_state_dict_into", "save_pretrained"]
