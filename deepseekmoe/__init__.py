"""deepseekmoe: DeepSeekMoE (fine-grained + shared experts) in PyTorch.

Public API:
    from deepseekmoe import ModelConfig, Transformer, presets
    cfg = presets.get("deepseekmoe-16b"); model = Transformer(cfg)

Package layout (one folder per concern, imports point down only): docs/architecture.md.
"""

from deepseekmoe.errors import ConfigError, UserError

__all__ = ["ModelConfig", "Transformer", "ModelOutput", "presets", "ConfigError", "UserError"]
__version__ = "0.1.0"
_MODEL_NAMES = ("ModelConfig", "ModelOutput", "Transformer", "presets")


def __getattr__(name: str):
    # The model (and so torch) is imported on first use, so that `deepseekmoe --help` stays fast.
    if name in _MODEL_NAMES:
        from deepseekmoe import model

        return getattr(model, name)
    raise AttributeError(f"module 'deepseekmoe' has no attribute {name!r}")
