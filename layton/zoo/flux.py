"""Tiny FLUX.1-dev: the real diffusers `FluxPipeline` classes with small configs and seeded weights.

`write_tiny_flux(dir)` writes a pipeline directory in the release layout of
black-forest-labs/FLUX.1-dev (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
text_encoder_2/, tokenizer_2/, scheduler/), so `FluxPipeline.from_pretrained(dir)` loads it
exactly as it loads the real weights. Only sizes differ from the real model:

    component        real FLUX.1-dev                      tiny
    transformer      19 double + 38 single blocks,        1 double + 1 single block,
                     24 heads x 128, joint dim 4096       2 heads x 16, joint dim 32
    vae              (128,256,512,512), 16 latent ch.     (8,16,16,16), 16 latent ch.
    text_encoder     CLIP ViT-L text (768, 12 layers)     CLIP text (32, 2 layers)
    text_encoder_2   T5 v1.1 XXL encoder (4096, 24 l.)    T5 v1.1-style encoder (32, 2 layers)

Kept from the real model because the pipeline's arithmetic depends on them: 16 latent channels
packed 2x2 into 64 transformer input channels, 8x VAE downsampling (four VAE levels), the VAE's
scaling/shift factors, guidance embedding (FLUX.1-dev is guidance-distilled), CLIP's 77-token
window, and the dynamic-shift flow-matching scheduler config. Height and width must therefore be
multiples of 16 (8x VAE x 2x2 packing); 64x64 gives a 4x4 grid of 16 image tokens.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from pathlib import Path

import torch

from layton.zoo.corpus import tokenizer_corpus

# FLUX.1-dev's scheduler/scheduler_config.json values (dynamic shifting by image sequence length).
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

# Characters every tiny tokenizer can spell even when the corpus never shows them
# (upper case, digits, punctuation), so arbitrary LAION prompts never hit <unk>.
_ALPHABET = [chr(c) for c in range(33, 127)]

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_MAX_LENGTH = 77  # CLIP's context window; FluxPipeline reads tokenizer.model_max_length.


# --- deterministic tokenizer training -------------------------------------------------------
# The `tokenizers` trainers break ties between equally frequent pairs/pieces by hash-map order,
# which changes from process to process, and the zoo corpus is full of exact ties. The tiny
# tokenizers therefore learn their vocabularies here, in plain Python with explicit tie-breaking,
# from words split by the real tokenizer's own `tokenizers` normalizer and pre-tokenizer; the
# result is an ordinary `tokenizers` BPE/Unigram model.


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table in byte order (the base symbols of byte-level BPE)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def pretokenized_words(backend, lines: list[str]) -> Counter:
    """Word frequencies as the tokenizer `backend` (normalizer + pre-tokenizer) splits `lines`."""
    words: Counter = Counter()
    for line in lines:
        text = backend.normalizer.normalize_str(line) if backend.normalizer is not None else line
        words.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return words


def learn_bpe(words: Counter, *, end_of_word_suffix: str = "", max_merges: int = 4000) -> list[tuple[str, str]]:
    # ~1-3 s in pure Python for the zoo corpus; callers cache the result per process.
    """BPE merges (Sennrich et al.): repeatedly merge the most frequent adjacent symbol pair,
    ties broken by the pair itself, until every word is one symbol or `max_merges` is reached."""
    seqs = {}
    for word, count in sorted(words.items()):
        symbols = list(word)
        symbols[-1] += end_of_word_suffix
        seqs[tuple(symbols)] = seqs.get(tuple(symbols), 0) + count
    merges = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for seq, count in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for seq, count in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if seq[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        seqs = merged
    return merges


def train_clip_tokenizer():
    """A CLIPTokenizer with a byte-level BPE ('</w>' word-end suffix) learned from the corpus.

    Vocabulary layout follows the real CLIP release: the 256 byte symbols, the same 256 with
    '</w>', then merged tokens in merge order, then <|startoftext|> and <|endoftext|> last.
    """
    from transformers import CLIPTokenizer

    merges = list(_clip_merges())
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[_CLIP_BOS] = len(vocab)
    vocab[_CLIP_EOS] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        pad_token=_CLIP_EOS,  # FLUX pads CLIP prompts with <|endoftext|>, as the release does
        unk_token=_CLIP_EOS,
        model_max_length=_CLIP_MAX_LENGTH,
    )


@functools.lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    from transformers import CLIPTokenizer

    # CLIPTokenizer's own normalizer (lower-case) and pre-tokenizer split the training text
    # exactly as encoding will.
    base = CLIPTokenizer(bos_token=_CLIP_BOS, eos_token=_CLIP_EOS, pad_token=_CLIP_EOS, unk_token=_CLIP_EOS)
    words = pretokenized_words(base.backend_tokenizer, tokenizer_corpus())
    return tuple(learn_bpe(words, end_of_word_suffix="</w>"))


def train_t5_tokenizer():
    """A T5Tokenizer with a SentencePiece-style Unigram model estimated from the corpus.

    Pieces are the corpus words ('▁' word marker, log relative frequency as score) and single
    characters (scored below any word), so Viterbi segmentation prefers whole words and spells
    anything else. Layout as in T5 v1.1: <pad>=0, </s>=1, <unk>=2, pieces by descending score,
    then the 100 <extra_id_N> sentinels; encoding appends </s>.
    """
    from transformers import T5Tokenizer

    base = T5Tokenizer()  # its Metaspace pre-tokenizer splits training text as encoding will
    words = pretokenized_words(base.backend_tokenizer, tokenizer_corpus())
    total = sum(words.values())
    scores = {w: math.log(c / total) for w, c in words.items()}
    char_score = min(scores.values()) - 5.0
    for ch in ["▁", *_ALPHABET, *("▁" + c for c in _ALPHABET)]:
        scores.setdefault(ch, char_score)
    pieces = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]
    return T5Tokenizer(vocab=vocab, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=100)


def build_tiny_flux(seed: int = 0):
    """The tiny FluxPipeline in memory (CPU, float32). Same seed -> identical weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = train_clip_tokenizer()
    tokenizer_2 = train_t5_tokenizer()

    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=_CLIP_MAX_LENGTH,
                hidden_act="quick_gelu",
                # pooled output = hidden state at the first <|endoftext|>, as in CLIP ViT-L
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(seed + 1)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's t5-v1_1-xxl
                tie_word_embeddings=False,
                is_encoder_decoder=True,
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
        )
        torch.manual_seed(seed + 2)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 VAE latent channels x (2x2 packed patch)
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_encoder_2.config.d_model,  # T5 token features
            pooled_projection_dim=text_encoder.config.hidden_size,  # CLIP pooled output
            guidance_embeds=True,  # FLUX.1-dev takes guidance as an input
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, like (16, 56, 56) -> 128
        )
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,  # four levels -> 8x downsampling
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    return pipe


def write_tiny_flux(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny FLUX.1-dev pipeline to `out_dir` (safetensors) and return the directory."""
    out_dir = Path(out_dir)
    pipe = build_tiny_flux(seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _write_clip_vocab_files(pipe.tokenizer, out_dir / "tokenizer")
    return out_dir


def _write_clip_vocab_files(tokenizer, tok_dir: Path) -> None:
    """Store the CLIP tokenizer as the FLUX.1-dev release does: vocab.json + merges.txt, no
    tokenizer.json, so loading exercises the same path as the real checkpoint."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (tok_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = "\n".join(" ".join(m) for m in model["merges"])
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + merges + "\n")
    (tok_dir / "tokenizer.json").unlink(missing_ok=True)
