"""HellaSwag's preprocessing for hellaswag_local.yaml: lm-eval's own function, imported rather than copied,
so that the local task builds exactly lm-eval's queries and choices."""

from lm_eval.tasks.hellaswag.utils import process_docs

__all__ = ["process_docs"]
