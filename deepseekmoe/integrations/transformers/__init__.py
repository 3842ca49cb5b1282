"""A native transformers model class for the released deepseek-moe format, backed by this
project's model code. The one line a user needs:

    import deepseekmoe.integrations.transformers  # registers model_type "deepseek"
    model = AutoModelForCausalLM.from_pretrained("deepseek-moe-16b-base")

(or `trust_remote_code=True` on a directory this project exported: its modeling file imports this
package). Importing registers `DeepseekConfig` with AutoConfig and `DeepseekModel` /
`DeepseekForCausalLM` with AutoModel / AutoModelForCausalLM.
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("deepseekmoe.integrations.transformers needs transformers: "
                      "pip install deepseekmoe[transformers]") from e

from deepseekmoe.integrations.transformers.configuration import DeepseekConfig
from deepseekmoe.integrations.transformers.modeling import (
    DeepseekForCausalLM,
    DeepseekModel,
    DeepseekPreTrainedModel,
)

__all__ = ["DeepseekConfig", "DeepseekForCausalLM", "DeepseekModel", "DeepseekPreTrainedModel", "register"]


def register() -> None:
    """Register the classes with transformers' Auto classes (idempotent; done on import)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from deepseekmoe.checkpoint.hf import MODEL_TYPE

    AutoConfig.register(MODEL_TYPE, DeepseekConfig, exist_ok=True)
    AutoModel.register(DeepseekConfig, DeepseekModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekConfig, DeepseekForCausalLM, exist_ok=True)


register()
