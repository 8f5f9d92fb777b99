"""Tiny ImageReward release: same files, key names and formats as THUDM's, small shapes, seeded weights.

    out_dir/ImageReward.pt     torch.save(state_dict) with upstream key names (incl. the persistent
                               blip.text_encoder.embeddings.position_ids buffer upstream's med BERT saves)
    out_dir/med_config.json    BertConfig JSON (hidden 64, 2 layers, 2 heads, encoder_width 128)
    out_dir/tokenizer/         WordPiece vocab built offline from `tokenizer_corpus()`, saved by
                               transformers' BertTokenizer with BLIP's [DEC]/[ENC] tokens added

The key list is spelled out here from BLIP's module layout rather than taken from the scorer's
modules, so the scorer's loader is checked against an independent description of the format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from layton.zoo.corpus import tokenizer_corpus

VIT = dict(image_size=224, patch=16, width=128, depth=2, mlp=512)  # heads = width // 64 = 2
BERT = dict(hidden=64, layers=2, heads=2, intermediate=128, max_positions=64)
HEAD_DIMS = [BERT["hidden"], 1024, 128, 64, 16, 1]  # upstream MLP(768): 1024, 128, 64, 16, 1
EMBED_DIM = 32
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece_vocab() -> list[str]:
    """Deterministic WordPiece vocab: specials, characters, ##characters, then every corpus word.

    `tokenizers`' WordPieceTrainer breaks ties in hash order, so two runs can differ; the tiny zoo
    must be byte-stable, so the vocab is built directly with the library's BERT normaliser and
    pre-tokeniser (every corpus word whole, anything else spelled out in characters).
    """
    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {piece for line in tokenizer_corpus() for piece, _ in pre.pre_tokenize_str(norm.normalize_str(line))}
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()\"&/"))
    return BERT_SPECIALS + chars + ["##" + c for c in chars] + sorted(words - set(chars))


def _write_tokenizer(out: Path) -> int:
    """Save the vocab as a BertTokenizer dir with BLIP's tokens added; return len(tokenizer)."""
    from transformers import BertTokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("".join(tok + "\n" for tok in _wordpiece_vocab()))
    tok = BertTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.model_max_length = 512
    tok.save_pretrained(str(out))
    return len(tok)


def _shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Upstream key -> shape for the tiny dims."""
    v, b = VIT, BERT
    grid = v["image_size"] // v["patch"]
    s: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, v["width"]),
        "blip.visual_encoder.pos_embed": (1, grid * grid + 1, v["width"]),
        "blip.visual_encoder.patch_embed.proj.weight": (v["width"], 3, v["patch"], v["patch"]),
        "blip.visual_encoder.patch_embed.proj.bias": (v["width"],),
        "blip.visual_encoder.norm.weight": (v["width"],),
        "blip.visual_encoder.norm.bias": (v["width"],),
    }
    for i in range(v["depth"]):
        p = f"blip.visual_encoder.blocks.{i}."
        for name, (o, n) in {"attn.qkv": (3 * v["width"], v["width"]), "attn.proj": (v["width"], v["width"]),
                             "mlp.fc1": (v["mlp"], v["width"]), "mlp.fc2": (v["width"], v["mlp"])}.items():
            s[p + name + ".weight"], s[p + name + ".bias"] = (o, n), (o,)
        for norm in ("norm1", "norm2"):
            s[p + norm + ".weight"] = s[p + norm + ".bias"] = (v["width"],)
    t = "blip.text_encoder."
    h = b["hidden"]
    s[t + "embeddings.word_embeddings.weight"] = (vocab_size, h)
    s[t + "embeddings.position_embeddings.weight"] = (b["max_positions"], h)
    s[t + "embeddings.LayerNorm.weight"] = s[t + "embeddings.LayerNorm.bias"] = (h,)
    for i in range(b["layers"]):
        p = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", h), ("crossattention", v["width"])):
            for name, n_in in (("query", h), ("key", kv), ("value", kv)):
                s[f"{p}{att}.self.{name}.weight"], s[f"{p}{att}.self.{name}.bias"] = (h, n_in), (h,)
            s[f"{p}{att}.output.dense.weight"], s[f"{p}{att}.output.dense.bias"] = (h, h), (h,)
            s[f"{p}{att}.output.LayerNorm.weight"] = s[f"{p}{att}.output.LayerNorm.bias"] = (h,)
        s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"] = (b["intermediate"], h), (b["intermediate"],)
        s[p + "output.dense.weight"], s[p + "output.dense.bias"] = (h, b["intermediate"]), (h,)
        s[p + "output.LayerNorm.weight"] = s[p + "output.LayerNorm.bias"] = (h,)
    s["blip.vision_proj.weight"], s["blip.vision_proj.bias"] = (EMBED_DIM, v["width"]), (EMBED_DIM,)
    s["blip.text_proj.weight"], s["blip.text_proj.bias"] = (EMBED_DIM, h), (EMBED_DIM,)
    for idx, (d_in, d_out) in zip((0, 2, 4, 6, 7), zip(HEAD_DIMS[:-1], HEAD_DIMS[1:])):
        s[f"mlp.layers.{idx}.weight"], s[f"mlp.layers.{idx}.bias"] = (d_out, d_in), (d_out,)
    return s


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random weights that keep activations O(1) so rewards differ visibly between images and prompts."""
    noise = torch.randn(shape, generator=gen)
    if "LayerNorm" in name or ".norm" in name:
        return (1.0 if name.endswith("weight") else 0.0) + 0.1 * noise
    if name.endswith("bias"):
        return 0.02 * noise
    if name.startswith("mlp."):  # linear chain with unit gain per layer, x2 overall for spread
        return noise * (2.0 if name == "mlp.layers.0.weight" else 1.0) / shape[1] ** 0.5
    if len(shape) >= 2 and "embeddings" not in name and "pos_embed" not in name and "cls_token" not in name:
        fan_in = int(torch.tensor(shape[1:]).prod())
        return noise / fan_in**0.5
    return 0.5 * noise


def write_tiny_imagereward(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny ImageReward release to `out_dir`; returns {'checkpoint', 'med_config', 'tokenizer'}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(out_dir / "tokenizer")
    med = {
        "architectures": ["BertModel"], "model_type": "bert",
        "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_size": BERT["hidden"], "intermediate_size": BERT["intermediate"],
        "num_attention_heads": BERT["heads"], "num_hidden_layers": BERT["layers"],
        "max_position_embeddings": BERT["max_positions"], "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size,
        "encoder_width": VIT["width"], "add_cross_attention": True,
    }
    (out_dir / "med_config.json").write_text(json.dumps(med, indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)
    sd = {name: _init(name, shape, gen) for name, shape in sorted(_shapes(vocab_size).items())}
    # Centre the tiny rewards near the 0.8 demo threshold (upstream rewards are ~N(0, 1)).
    sd["mlp.layers.7.bias"] = torch.full((1,), 1.0)
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(BERT["max_positions"])[None]
    torch.save(sd, out_dir / "ImageReward.pt")
    return {"checkpoint": out_dir / "ImageReward.pt", "med_config": out_dir / "med_config.json",
            "tokenizer": out_dir / "tokenizer"}
