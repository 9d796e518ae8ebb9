"""Parameter-level per-sample harmonization by ghost Grams (path decomposition).

One module per layer type (``linear``, ``conv``, ``layer_norm``, ``embedding``), free
parameters (``free``) and a torch.func fallback (``fallback``); see :class:`ParameterHarmonizer`.
"""

from . import conv, embedding, layer_norm, linear  # noqa: F401  (fill the layer registry)
from .harmonizer import ParameterHarmonizer, gram_to_weights
from .registry import RULES, LayerRule, register

__all__ = ["ParameterHarmonizer", "gram_to_weights", "LayerRule", "register", "RULES"]
