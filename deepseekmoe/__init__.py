"""deepseekmoe: DeepSeekMoE (fine-grained + shared experts) in PyTorch.

Public API:
    from deepseekmoe import ModelConfig, Transformer, presets
    cfg = presets.get("deepseekmoe-16b"); model = Transformer(cfg)

Package layout (one folder per concern, imports point down only): docs/architecture.md.
"""

from deepseekmoe.errors import ConfigError, UserError
from deepseekmoe.model import ModelConfig, ModelOutput, Transformer, presets

__all__ = ["ModelConfig", "Transformer", "ModelOutput", "presets", "ConfigError", "UserError"]
__version__ = "0.1.0"
