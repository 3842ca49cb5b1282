"""The files beside the weights of a released-format directory: the tokenizer files that travel
with a checkpoint, and what makes an export open in transformers as it is (the remote code that
config.json's auto_map names, which imports deepseekmoe.integrations.transformers;
generation_config.json; a tokenizer_config.json with bos / eos / pad and the chat template).
checkpoint/hf.py writes the weights and config.json and calls `write_transformers_files`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from deepseekmoe.errors import DataError
from deepseekmoe.model.config import ModelConfig

# Files beside the weights that travel with a checkpoint: the tokenizer (and chat template, in
# tokenizer_config.json), which every format keeps. The remote code that config.json's auto_map
# names is not copied: save_model writes its own (REMOTE_CODE), which imports this package's class.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
COMPANION_FILES = (*TOKENIZER_FILES, "tokenization_deepseek_fast.py")
_REMOTE_STUB = (
    '"""Remote code of a deepseek-moe checkpoint written by deepseekmoe: transformers\' trust_remote_code\n'
    'loads this file, which takes the {what} from the deepseekmoe package."""\n\n'
    "try:\n    from deepseekmoe.integrations.transformers import {names}\n"
    "except ImportError as e:\n"
    "    raise ImportError(\"this checkpoint's model code is the deepseekmoe package: \"\n"
    "                      \"pip install deepseekmoe[transformers]\") from e\n\n"
    "__all__ = [{quoted}]\n")
AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekConfig", "AutoModel": "modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"}
REMOTE_CODE = {
    "configuration_deepseek.py": ("config class", ("DeepseekConfig",)),
    "modeling_deepseek.py": ("model classes", ("DeepseekConfig", "DeepseekForCausalLM", "DeepseekModel")),
}


def write_remote_code(path: Path) -> None:
    """The files AUTO_MAP names: each imports this package's class (deepseekmoe.integrations.transformers)
    and, where the package is missing, fails with one message saying what to install."""
    for fname, (what, names) in REMOTE_CODE.items():
        quoted = ", ".join(f'"{n}"' for n in names)
        (Path(path) / fname).write_text(_REMOTE_STUB.format(what=what, names=", ".join(names), quoted=quoted))


def write_transformers_files(path: Path, cfg: ModelConfig) -> None:
    """Complete an export directory for transformers: the remote code config.json's auto_map names
    (REMOTE_CODE), generation_config.json, and, beside a tokenizer.json, a tokenizer_config.json
    with bos / eos / pad and the chat template (an existing one keeps its values; missing keys are
    added). AutoModelForCausalLM(trust_remote_code=True) and AutoTokenizer then open it as it is."""
    from deepseekmoe.data.chat import DEEPSEEK_CHAT_JINJA
    from deepseekmoe.data.tokenizer import Tokenizer, read_json_object

    write_remote_code(path)
    gen = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
           "pad_token_id": cfg.eos_token_id, "transformers_version": "4.36.0"}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if not (path / "tokenizer.json").is_file():
        return
    tc_file = path / "tokenizer_config.json"
    if tc_file.is_file():
        tc = read_json_object(tc_file, "rewrite it as a JSON object, or delete it to have it written")
    else:
        try:
            tok = Tokenizer.from_file(path / "tokenizer.json", bos=cfg.bos_token_id, eos=cfg.eos_token_id)
        except DataError as e:  # the copy is kept as it was given; only its description is missing
            warnings.warn(f"no tokenizer_config.json written: {e}", RuntimeWarning, stacklevel=3)
            return
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    tc.setdefault("pad_token", tc.get("eos_token"))
    tc.setdefault("model_input_names", ["input_ids", "attention_mask"])  # no token_type_ids for generate
    tc.setdefault("model_max_length", cfg.max_position_embeddings)
    tc.setdefault("chat_template", DEEPSEEK_CHAT_JINJA)
    tc_file.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
