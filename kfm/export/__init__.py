"""Export kfm checkpoints to Hugging Face transformers (Llama / Qwen3) and map weights back."""

from kfm.export.hf import (
    ExportError,
    export_hf,
    from_hf_state_dict,
    hf_config,
    to_hf_state_dict,
)

__all__ = ["ExportError", "export_hf", "from_hf_state_dict", "hf_config", "to_hf_state_dict"]
