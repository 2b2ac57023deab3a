"""Hugging Face import and export for ders-megatron.

* :func:`import_hf`: a Llama / Mistral / Qwen2 / Qwen3 (dense) or Mixtral / Qwen2-MoE /
  Qwen3-MoE folder (or a repo id in the local HF cache) -> a megatron-core checkpoint
  (megatron.training layout, any TP/EP/PP on load).
* :func:`export_hf`: a megatron-core checkpoint (vanilla or DeRS MoE, or dense)
  -> ``mixtral`` / ``qwen2_moe`` / ``qwen3_moe`` with synthesized experts, the compact
  ``ders`` format, or ``llama`` / ``mistral`` / ``qwen2`` / ``qwen3``.
* :mod:`~ders_megatron.convert.hf.peft_adapter`: DeRS-LM deltas as a PEFT LoRA adapter
  over the upcycled base.

Importing this package registers the compact format (``model_type = "ders_moe"``)
with ``AutoConfig`` and ``AutoModelForCausalLM``; exports also carry the modeling
files for ``trust_remote_code=True`` without ders-megatron.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from ders_megatron.convert.hf.configuration_ders_moe import DeRSMoEConfig
from ders_megatron.convert.hf.dims import EXPORT_FORMATS, IMPORT_FAMILIES, ConversionError, ModelDims
from ders_megatron.convert.hf.exporter import export_hf
from ders_megatron.convert.hf.importer import import_hf
from ders_megatron.convert.hf.modeling_ders_moe import DeRSMoEForCausalLM

AutoConfig.register(DeRSMoEConfig.model_type, DeRSMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(DeRSMoEConfig, DeRSMoEForCausalLM, exist_ok=True)

__all__ = [
    "EXPORT_FORMATS",
    "IMPORT_FAMILIES",
    "ConversionError",
    "DeRSMoEConfig",
    "DeRSMoEForCausalLM",
    "ModelDims",
    "export_hf",
    "import_hf",
]
