"""Small models with a ``method=`` switch, used by the benchmark tasks and the examples."""

from .blocks import MLP, Block
from .encoder import EncoderClassifier
from .lm import CausalLM

__all__ = ["Block", "MLP", "CausalLM", "EncoderClassifier"]
