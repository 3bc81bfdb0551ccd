"""The slow sentencepiece Llama tokenizer that original-format LLaVA checkpoints were made with.

Upstream LLaVA loads ``AutoTokenizer.from_pretrained(model_path, use_fast=False)``, which under transformers
4.31-4.37 is ``LlamaTokenizer`` (``tokenization_llama.py``); :class:`SlowLlamaTokenizer` reproduces it on
transformers 5.
"""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SPIECE_UNDERLINE, SentencePieceBackend


class SlowLlamaTokenizer(SentencePieceBackend):
    """transformers 4.31-4.37's slow ``LlamaTokenizer``, which upstream LLaVA loads with ``use_fast=False``.

    transformers 5 has no sentencepiece Llama tokenizer any more: its ``LlamaTokenizer`` is a tokenizers
    conversion, and ``AutoTokenizer`` on a ``model_type: llava`` folder drops the leading ``▁``. This class
    keeps 4.36's rules (``tokenization_llama.py``): with ``legacy`` (the default when the config does not
    say) the text goes to sentencepiece as is; with ``legacy: false`` a ``▁`` is prepended, the model's dummy
    prefix is switched off, and the prefix is dropped before a leading special token. BOS (and EOS when
    ``add_eos_token``) are added; decoding goes through sentencepiece (byte-fallback pieces included).
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file, legacy=None, add_bos_token=True, add_eos_token=False, **kwargs):
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(vocab_file=vocab_file, legacy=True if legacy is None else legacy,
                         add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs)  # fmt: skip

    def tokenize(self, text, **kwargs):
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos, eos = [1] * self.add_bos_token, [1] * self.add_eos_token
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def convert_tokens_to_string(self, tokens):
        if not tokens:
            return ""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):  # the prefix space tokenize() added
            tokens[0] = tokens[0][1:]
        out, pieces, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not prev_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(pieces) + token
                pieces, prev_special = [], True
            else:
                pieces.append(token)
                prev_special = False
        return out + self.sp_model.decode(pieces)
