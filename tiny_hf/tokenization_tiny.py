"""TinyTokenizerFast: the model's tokenizer in transformers, a byte-level BPE (GPT-2 style) held in tokenizer.json.

This file is copied into exported model folders and loaded there with `trust_remote_code=True`, so it imports
only transformers and tokenizers, never the rest of tiny_hf. The vocabulary itself comes from `tiny_hf.bpe` (our
from-scratch trainer, Sennrich et al. 2016 on bytes as in Radford et al. 2019) via `TinyTokenizerFast.from_tokenizer`.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

# The special tokens and their ids (0..4). pad differs from eos: a collator that masks pad in the labels would
# otherwise also mask every end-of-text, and the model would never learn to stop.
EOS_TOKEN = "<|endoftext|>"  # 0: ends (and separates) documents
BOS_TOKEN = "<|bos|>"  # 1
PAD_TOKEN = "<|pad|>"  # 2
IM_START = "<|im_start|>"  # 3: ChatML turn start
IM_END = "<|im_end|>"  # 4: ChatML turn end
SPECIAL_TOKENS = [EOS_TOKEN, BOS_TOKEN, PAD_TOKEN, IM_START, IM_END]

# ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message. The {% generation %} block marks what the
# assistant says (its <|im_end|> included, so the model learns to stop) for return_assistant_tokens_mask, which
# TRL's SFTTrainer(assistant_only_loss=True) uses to compute the loss on completions only.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class TinyTokenizerFast(PreTrainedTokenizerFast):
    """Byte-level BPE tokenizer for the tiny models: ids 0..4 are `SPECIAL_TOKENS`, then 256 bytes, then merges.

    No bos/eos is added when encoding (as GPT-2); pretraining joins documents with `<|endoftext|>` and chat data
    goes through `apply_chat_template`. Build one with `from_tokenizer` (or `tiny_hf.bpe.train_tokenizer`), then
    `save_pretrained` / `from_pretrained` as any transformers tokenizer.
    """

    # No __init__ on purpose: transformers 5 loads a subclass *without* its own __init__ straight from
    # tokenizer.json; with one, it passes vocab/merges instead and the subclass must rebuild the backend itself.
    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, model_max_length: int = 2048, **kwargs) -> TinyTokenizerFast:
        """Wrap a byte-level BPE `tokenizers.Tokenizer` whose vocabulary starts with `SPECIAL_TOKENS`.

        Args:
            tokenizer: the backend, e.g. `tiny_hf.bpe.BPETokenizer.to_tokenizers()`.
            model_max_length: the longest sequence the model takes (truncation uses it).
            **kwargs: passed on to `PreTrainedTokenizerFast` (they win over the defaults here).
        """
        vocab = tokenizer.get_vocab()
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if vocab.get(token) != expected_id:
                raise ValueError(f"{token!r} has id {vocab.get(token)} in the tokenizer, expected {expected_id}")
        defaults = dict(
            eos_token=EOS_TOKEN,
            bos_token=BOS_TOKEN,
            pad_token=PAD_TOKEN,
            extra_special_tokens=[IM_START, IM_END],
            chat_template=CHAT_TEMPLATE,
            model_max_length=model_max_length,
            padding_side="right",
            clean_up_tokenization_spaces=False,  # byte-level decoding is exact; "clean up" would alter text
        )
        return cls(tokenizer_object=tokenizer, **{**defaults, **kwargs})


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "TinyTokenizerFast"]
