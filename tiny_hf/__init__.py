"""tiny-hf: a from-scratch decoder-only transformer and BPE tokenizer that are native transformers models.

Importing the package registers the model type "tiny" with AutoConfig, AutoModel, AutoModelForCausalLM,
AutoModelForSequenceClassification and AutoTokenizer, so saved folders load through the Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from .configuration_tiny import PRESETS, TinyConfig
from .convert import export, from_llama, save_model, to_llama
from .modeling_tiny import TinyForCausalLM, TinyForSequenceClassification, TinyModel, TinyPreTrainedModel
from .tokenization_tiny import TinyTokenizerFast

AutoConfig.register(TinyConfig.model_type, TinyConfig, exist_ok=True)
AutoModel.register(TinyConfig, TinyModel, exist_ok=True)
AutoModelForCausalLM.register(TinyConfig, TinyForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(TinyConfig, TinyForSequenceClassification, exist_ok=True)
AutoTokenizer.register(TinyConfig, fast_tokenizer_class=TinyTokenizerFast, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "TinyConfig",
    "TinyForCausalLM",
    "TinyForSequenceClassification",
    "TinyModel",
    "TinyPreTrainedModel",
    "TinyTokenizerFast",
    "export",
    "from_llama",
    "save_model",
    "to_llama",
]
