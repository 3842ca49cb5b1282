"""The single-device model: configuration and presets, the layers, the Transformer, its
initialisation, and the MoE layer (`model.moe`). Nothing here knows about devices or ranks;
parallelism is applied after construction (deepseekmoe.parallel).

    config.py       ModelConfig (validated dataclass) and the parameter / FLOP accounting
    dtypes.py       dtype names (float32/bf16/...) -> torch dtypes: every flag and field
    presets.py      every model of the paper by name
    layers.py       RMSNorm, RoPE, attention, the SwiGLU MLP
    transformer.py  Block, Transformer, ModelOutput
    init.py         weight initialisation (seeded, layout-independent)
    info.py         the `deepseekmoe info` command
    moe/            router, dispatch, expert backends, the MoE layer
"""

from deepseekmoe.model import presets
from deepseekmoe.model.config import ModelConfig
from deepseekmoe.model.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "ModelOutput", "Transformer", "presets"]
