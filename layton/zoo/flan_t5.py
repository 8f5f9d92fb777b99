"""Tiny google/flan-t5-xl: the real transformers `T5ForConditionalGeneration` with a small config.

LaytonGen conditions on flan-t5-xl encoder features (LlamaGen's `language/t5.py` loads
`T5EncoderModel` from the full flan-t5-xl release). `write_tiny_flan_t5(dir)` writes a directory in
that release's layout: config.json (architectures T5ForConditionalGeneration), safetensors weights
of encoder *and* decoder, and the tokenizer files next to them, so `T5EncoderModel.from_pretrained`
takes the encoder out of a whole encoder-decoder checkpoint exactly as it does for the release.
Only sizes differ:

    setting                          real flan-t5-xl       tiny
    d_model / d_kv / num_heads       2048 / 64 / 32        64 / 16 / 4
    d_ff (gated-gelu)                5120                  128
    encoder / decoder layers         24 / 24               2 / 1
    relative attention buckets       32, max distance 128  8, max distance 32
    vocabulary (tokenizer / rows)    32100 / 32128         520 / 640 (both padded to x128)

Kept from the real model: T5 v1.1 choices (gated-gelu feed-forward, untied input and output
embeddings, no biases, RMS layer norm eps 1e-6), pad=0 / </s>=1 / <unk>=2 with the 100 sentinel
tokens, the embedding matrix padded past the tokenizer to a multiple of 128, and float32 weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from layton.zoo.text_tokenizers import train_t5_tokenizer


def tiny_t5_v11_config(tokenizer, **sizes):
    """A T5 v1.1-architecture `T5Config` (as t5-v1_1-xxl and flan-t5) for `tokenizer`, with `sizes`.

    Shared by the tiny T5 encoders of the zoo; `sizes` gives d_model, d_kv, d_ff, num_layers,
    num_heads, relative_attention_* and, where it differs from the tokenizer, vocab_size.
    """
    from transformers import T5Config

    return T5Config(
        vocab_size=sizes.pop("vocab_size", len(tokenizer)),
        feed_forward_proj="gated-gelu",  # T5 v1.1: GEGLU feed-forward
        tie_word_embeddings=False,  # v1.1 unties the lm_head from the input embedding
        is_encoder_decoder=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **sizes,
    )


FLAN_T5_TINY_SIZES = dict(
    d_model=64,
    d_kv=16,
    num_heads=4,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=1,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
)


def build_tiny_flan_t5(seed: int = 0):
    """(tiny T5ForConditionalGeneration, its T5Tokenizer) in memory, CPU float32, seeded."""
    from transformers import T5ForConditionalGeneration

    tokenizer = train_t5_tokenizer()
    tokenizer.model_max_length = 512  # the release's tokenizer_config value
    vocab_rows = -(-len(tokenizer) // 128) * 128  # flan-t5 pads its 32100-token vocabulary to 32128 rows
    config = tiny_t5_v11_config(tokenizer, vocab_size=vocab_rows, **FLAN_T5_TINY_SIZES)
    with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's global RNG
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config).eval()
        # transformers 5 forces config.tie_word_embeddings=True and builds lm_head tied to `shared`;
        # the release has its own lm_head.weight (and says tie_word_embeddings false), so untie it,
        # initialised as T5's _init_weights does for an untied head (normal, std 1).
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    model.all_tied_weights_keys.pop("lm_head.weight", None)
    model.config.tie_word_embeddings = False  # written to config.json as in the release
    return model, tokenizer


def write_tiny_flan_t5(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny flan-t5-xl release (weights + tokenizer in one directory); returns the directory."""
    out_dir = Path(out_dir)
    model, tokenizer = build_tiny_flan_t5(seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
