"""Optional bridges to other ecosystems, each behind its own extra: `transformers` (a native
Hugging Face model class for the released deepseek-moe format, `pip install deepseekmoe[transformers]`).
Nothing here is imported by the rest of the package."""
