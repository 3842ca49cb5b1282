"""deepseekmoe: DeepSeekMoE (fine-grained + shared experts) in PyTorch.

Public API:
    from deepseekmoe import ModelConfig, Transformer, presets
    cfg = presets.get("deepseekmoe-16b"); model = Transformer(cfg)
"""

from . import presets
from .config import ModelConfig
from .errors import ConfigError, UserError
from .model import ModelOutput, Transformer

__all__ = ["ModelConfig", "Transformer", "ModelOutput", "presets", "ConfigError", "UserError"]
__version__ = "0.1.0"
