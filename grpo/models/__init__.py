"""Loading and saving Hugging Face-format checkpoints (dense and MoE), and tiny models.

load_model streams safetensors straight into a transformers model built on the meta
device, stacking per-expert tensors; save_model writes them back one tensor per expert;
make_tiny builds small random checkpoints with a character tokenizer for tests and demos.
"""

from .layout import SUPPORTED_FAMILIES, CheckpointError
from .loading import load_model
from .saving import save_model
from .tiny import TINY_FAMILIES, char_tokenizer, make_tiny

__all__ = [
    "SUPPORTED_FAMILIES",
    "TINY_FAMILIES",
    "CheckpointError",
    "char_tokenizer",
    "load_model",
    "make_tiny",
    "save_model",
]
