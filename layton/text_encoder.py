"""LaytonGen's text features: flan-t5-xl encoder states in LlamaGen's left-padded 120-token layout.

LlamaGen (`language/t5.py`, `autoregressive/sample/sample_t2i.py`, `dataset/t2i.py`) conditions its
t2i GPT on `T5EncoderModel.last_hidden_state` of the prompt tokenized to 120 tokens (</s> appended,
longer prompts truncated), with the valid tokens moved to the *end* of the 120 rows and the padding
rows zeroed; the mask is 0 for padding, 1 for the valid tokens at the end. Sampling builds that
layout from the tokenizer's right-padded batch (`left_pad`); training reads stored valid-token
features and places them at the end of a zero buffer (`pad_valid_tokens`). Both give the same
tensors, so a precompute pass stores only `T5TextEncoder.encode_valid` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from layton.model_files import ModelFileError, check_file, check_model_dir

T5_MAX_LENGTH = 120  # LlamaGen's t5 token count (cls_token_num of the t2i GPT)
_WHAT = "flan-t5 text encoder"


def normalize_prompt(text) -> str:
    """LlamaGen's caption preprocessing without its ftfy/bs4 cleaning: lower case, stripped."""
    return str(text).lower().strip()


@dataclass
class TextFeatures:
    features: torch.Tensor  # (B, 120, D) float32, valid tokens last, padding rows exactly zero
    mask: torch.Tensor  # (B, 120) bool, False...True (left padded)
    n_tokens: list[int]  # valid tokens per prompt, </s> included
    truncated: list[bool]  # the prompt had more than 120 tokens before truncation


def left_pad(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (valid tokens first, as the tokenizer pads) -> LlamaGen's left-padded layout.

    Each row is rolled right by its padding count, so its n valid rows become the last n; the
    padding rows are set to zero (LlamaGen multiplies by the mask). `mask` must be a prefix of ones.
    """
    b, length = mask.shape
    n = mask.sum(dim=1, keepdim=True)  # (B, 1)
    positions = torch.arange(length, device=mask.device).expand(b, length)
    new_mask = positions >= length - n
    source = (positions - (length - n)) % length  # output row j reads input row j - (L - n)
    rolled = torch.gather(features, 1, source[..., None].expand(-1, -1, features.shape[-1]))
    return torch.where(new_mask[..., None], rolled, torch.zeros((), dtype=features.dtype)), new_mask


def pad_valid_tokens(
    rows: Sequence[np.ndarray | torch.Tensor], max_length: int = T5_MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored valid-token features [(n_i, D), ...] -> left-padded (B, L, D) float32 and (B, L) bool.

    What LlamaGen's t2i dataset does with its stored features: a zero buffer with the valid rows at
    the end. A row longer than `max_length` keeps its first `max_length` tokens.
    """
    if not rows:
        raise ValueError("pad_valid_tokens needs at least one row (the feature width comes from the rows)")
    # np.array copies: rows are often read-only views of parquet bytes (np.frombuffer).
    tensors = [(r if isinstance(r, torch.Tensor) else torch.from_numpy(np.array(r)))[:max_length] for r in rows]
    features = torch.zeros(len(tensors), max_length, tensors[0].shape[-1], dtype=torch.float32)
    mask = torch.zeros(len(tensors), max_length, dtype=torch.bool)
    for i, t in enumerate(tensors):
        n = t.shape[0]
        if n:  # features[i, L-0:] would be the whole row
            features[i, max_length - n :] = t.float()
            mask[i, max_length - n :] = True
    return features, mask


def _quiet_load(fn, *args, **kwargs):
    # T5EncoderModel from a full T5ForConditionalGeneration release reports the unused lm_head (and
    # logs per load); that is expected, and missing encoder weights are checked explicitly instead.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


class T5TextEncoder:
    """The flan-t5 encoder of a release directory (weights and tokenizer in one directory, as
    google/flan-t5-xl ships them), producing LlamaGen's text features."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_length: int = T5_MAX_LENGTH):  # fmt: skip
        from transformers import AutoTokenizer, T5EncoderModel

        root = check_model_dir(path, _WHAT)
        check_file(root / "tokenizer_config.json", _WHAT)
        self.tokenizer = AutoTokenizer.from_pretrained(str(root))
        # transformers 5 takes `dtype` (`torch_dtype` is its deprecated alias).
        model, info = _quiet_load(T5EncoderModel.from_pretrained, str(root), dtype=dtype, output_loading_info=True)
        if info["missing_keys"]:  # they would be silently random-initialised
            missing = sorted(info["missing_keys"])
            raise ModelFileError(f"{_WHAT}: {root} lacks encoder weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def _encode_right_padded(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """(B, L, D) float32 CPU features in the tokenizer's right-padded layout, (B, L) bool mask, truncated."""
        texts = [normalize_prompt(p) for p in prompts]
        tok = self.tokenizer(texts, max_length=self.max_length, padding="max_length", truncation=True,
                             add_special_tokens=True, return_tensors="pt")  # fmt: skip
        # Untruncated lengths only to report truncation; verbose=False: no "longer than maximum" warning.
        full = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        out = self.model(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device))
        return out.last_hidden_state.float().cpu(), tok["attention_mask"].bool(), [len(ids) > self.max_length for ids in full]

    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        """LlamaGen's sampling-time features for `prompts` (one batch; "" encodes as </s> alone)."""
        features, mask, truncated = self._encode_right_padded(prompts)
        n_tokens = mask.sum(dim=1).tolist()
        features, mask = left_pad(features, mask)
        return TextFeatures(features=features, mask=mask, n_tokens=n_tokens, truncated=truncated)

    def encode_valid(self, prompts: Sequence[str]) -> tuple[list[np.ndarray], list[bool]]:
        """For a precompute pass: per prompt its (n_i, D) float16 valid-token features (in token
        order, </s> last), and whether it was truncated. `pad_valid_tokens(rows)` rebuilds `encode`'s
        tensors (to float16 precision)."""
        features, mask, truncated = self._encode_right_padded(prompts)
        rows = [f[: int(n)].to(torch.float16).numpy() for f, n in zip(features, mask.sum(dim=1))]
        return rows, truncated
