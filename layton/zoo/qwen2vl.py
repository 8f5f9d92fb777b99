"""Tiny Qwen2-VL: the real transformers `Qwen2VLForConditionalGeneration` with a small config.

`write_tiny_qwen2vl(dir)` writes a model directory in the layout of Qwen/Qwen2-VL-*-Instruct
(config.json, generation_config.json, model.safetensors, tokenizer + image/video processor
configs, chat template), so `AutoProcessor.from_pretrained(dir)` and
`Qwen2VLForConditionalGeneration.from_pretrained(dir)` load it offline (vLLM reads the same
layout; not exercised here, vLLM needs a GPU).

    part           real Qwen2-VL-2B                         tiny
    vision tower   32 blocks, 1280 wide, 16 heads           2 blocks, 32 wide, 2 heads
    text model     28 layers, 1536 wide, 12/2 heads,        2 layers, 64 wide, 4/2 heads,
                   mrope sections (16, 24, 24)              mrope sections (2, 3, 3)
    tokenizer      151k byte-level BPE                      byte-level BPE learned from the zoo corpus
    image pixels   56^2 .. 28^2*1280                        56^2 .. 112^2 (4..16 vision tokens)

Kept from the real model: patch 14, temporal patch 2, 2x2 spatial merge, multimodal RoPE, the
Qwen2 pre-tokenizer and special tokens in the release's order, the ChatML-style chat template
with <|vision_start|><|image_pad|><|vision_end|> image placeholders.

Readable output from random weights: greedy decoding of a random model tends to pick special
tokens (<|im_end|> -> empty caption) or byte fragments. `_favour_word_tokens` therefore
zeroes the lm_head rows of every token that is not a plain lower-case word piece (specials,
bytes, whitespace, punctuation): their logits are then exactly 0 while word pieces keep random
logits, some of which are positive, so greedy decoding always emits words and runs to
max_new_tokens. Deterministic, and only the output projection is touched.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from layton.zoo.corpus import tokenizer_corpus
from layton.zoo.text_tokenizers import bpe_vocab, byte_symbols, learn_bpe, pretokenized_words

# Qwen2-VL's added tokens in the release's id order (<|endoftext|> first, then ChatML, grounding,
# vision); in the real vocabulary they are 151643..151656, here they follow the trained BPE.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Renders the Qwen2-VL chat format: a default system turn, ChatML turns, and each image/video
# content part as <|vision_start|><|image_pad|><|vision_end|> (the processor then repeats
# <|image_pad|> once per merged vision token). Content may be a string or a list of parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url', 'image_pil') or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] in ('video', 'video_url') or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

MIN_PIXELS = 56 * 56  # 4x4 patches of 14 px -> 4 vision tokens after the 2x2 merge
MAX_PIXELS = 112 * 112  # 8x8 patches -> 16 vision tokens


def train_qwen2_tokenizer():
    """A Qwen2Tokenizer: byte-level BPE learned from the zoo corpus, Qwen2-VL's special tokens."""
    from transformers import Qwen2Tokenizer

    merges = list(_qwen2_merges())
    vocab = bpe_vocab(byte_symbols(), merges, list(SPECIAL_TOKENS))
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",  # the Instruct release ends assistant turns with <|im_end|>
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
        padding_side="left",  # decoder-only batched generation
    )


@functools.lru_cache(maxsize=1)
def _qwen2_merges() -> tuple[tuple[str, str], ...]:
    from transformers import Qwen2Tokenizer

    # Qwen2Tokenizer's own normalizer and pre-tokenizer split the training text as encoding will.
    # Captions are sentences: learn from capitalised, punctuated lines too.
    corpus = tokenizer_corpus()
    corpus += [line.capitalize() + "." for line in corpus]
    return tuple(learn_bpe(pretokenized_words(Qwen2Tokenizer().backend_tokenizer, corpus)))


def build_tiny_processor(tokenizer=None):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = tokenizer or train_qwen2_tokenizer()
    pixels = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2)
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_qwen2vl(seed: int = 0):
    """(model, processor) in memory, CPU float32. Same seed -> identical weights."""
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    processor = build_tiny_processor()
    tok = processor.tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    head_dim = 16
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=64 // head_dim,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            max_window_layers=2,
            # Multimodal RoPE: temporal/height/width sections of head_dim / 2 frequencies.
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,  # lm_head is edited below; embeddings stay random
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            num_heads=2,
            mlp_ratio=2,
            hidden_size=64,  # merger output = text hidden size
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seed without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
    _favour_word_tokens(model, tok)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    return model, processor


def _favour_word_tokens(model, tokenizer) -> None:
    """Zero the lm_head rows of tokens that are not lower-case word pieces (see module doc)."""
    word = re.compile(r"^ ?[a-z]{2,}$")
    keep = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token, i in tokenizer.get_vocab().items():
        keep[i] = bool(word.match(tokenizer.convert_tokens_to_string([token])))
    keep[tokenizer.all_special_ids] = False
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0


def write_tiny_qwen2vl(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny Qwen2-VL model + processor to `out_dir` (safetensors); return the directory."""
    out_dir = Path(out_dir)
    model, processor = build_tiny_qwen2vl(seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
