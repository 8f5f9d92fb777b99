"""LaytonGen text -> image: flan-t5 features -> GPT samples image tokens with CFG -> Layton decoder.

A LaytonGen directory (what training exports) holds the trained parts in subfolders named by its
index, relative to the directory, so it can be moved or copied whole; the frozen text encoder is
named by path:

    model_index.json
        _class_name    "LaytonGenPipeline"
        format         "laytongen/2"
        gpt            ["layton.gpt", "GPT"]                   -> gpt/
        tokenizer      ["layton.tokenizer", "LaytonTokenizer"] -> tokenizer/
        text_encoder   the flan-t5 release (an absolute path, or a hub id)
        image_size     the tokenizer's encoder size the GPT was trained on (256 px -> 16x16 tokens)
        sampling       default sampling settings (cfg_scale, temperature, top_k, top_p, ...)
    gpt/          config.json + model.safetensors      (`GPT.save_pretrained`)
    tokenizer/    a copy of the Layton tokenizer directory (`layton.tokenizer`: model_index.json,
                  controlnet/, embedder/, empty_prompt/); it names its own upstream SDXL and VQ

`save_laytongen` writes one (index last); `LaytonGenPipeline.from_pretrained` reads it. A directory in
the first layout (`laytongen.json` beside the GPT files) is refused with a `ModelFileError` that says
how to convert it (`convert_legacy_laytongen`).

Prompt rules: a prompt is lower-cased and stripped (LlamaGen's preprocessing); an empty prompt is
sampled unconditionally (the GPT's unconditional caption, no guidance); a prompt longer than 120
T5 tokens is truncated to 120 (the result says `truncated`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from layton.acceleration import accelerate_gpt, autocast
from layton.gpt import CONFIG_NAME as GPT_CONFIG_NAME
from layton.gpt import GPT
from layton.gpt import WEIGHTS_NAME as GPT_WEIGHTS_NAME
from layton.gpt_sampling import SamplingParams, generate_tokens, guides
from layton.model_files import ModelFileError, check_file, read_model_index
from layton.storage import is_uri, local_copy
from layton.text_encoder import T5TextEncoder
from layton.tokenizer import INDEX_NAME as TOKENIZER_INDEX
from layton.tokenizer import LaytonTokenizer
from layton.tokenizer import convert_legacy_tokenizer
from layton.tokenizer import copy_tokenizer

INDEX_NAME = "model_index.json"
CLASS_NAME = "LaytonGenPipeline"
FORMAT = "laytongen/2"
GPT_SUBFOLDER = "gpt"
TOKENIZER_SUBFOLDER = "tokenizer"
# The first layout, still recognised so that it can be refused clearly and converted.
LEGACY_SPEC_NAME = "laytongen.json"
LEGACY_FORMAT = "laytongen/1"


@dataclass
class Generated:
    prompt: str
    seed: int
    tokens: torch.Tensor  # (h, w) image token ids
    image: Image.Image | None
    unconditional: bool  # the prompt was empty
    truncated: bool  # the prompt was cut to 120 T5 tokens
    text_tokens: int


def _abs(p: str | Path) -> str:
    return str(Path(p).resolve()) if Path(p).exists() else str(p)


def read_laytongen_index(directory: str | Path, what: str = "LaytonGen directory") -> dict:
    """The parsed `model_index.json` of a LaytonGen directory, checked (class, format, the GPT and
    tokenizer subfolders); errors name `what` and the path, and say how to convert an old layout. A URI
    is read from its local copy (`layton.storage.local_copy`)."""
    d = local_copy(directory, what)
    legacy = None
    if not (d / INDEX_NAME).is_file() and (d / LEGACY_SPEC_NAME).is_file():
        legacy = ModelFileError(
            f"{what}: {d} is a LaytonGen directory in the old layout ({LEGACY_SPEC_NAME} beside the GPT files, "
            f"format {LEGACY_FORMAT}); convert it once into the {INDEX_NAME} layout with "
            f"`layton convert laytongen {d} NEW_DIR` (layton.laytongen.convert_legacy_laytongen) and load NEW_DIR")
    index = read_model_index(d, CLASS_NAME, FORMAT, what, "a LaytonGen", legacy)
    check_file(d / GPT_SUBFOLDER / GPT_CONFIG_NAME, f"{what} (gpt/)")
    check_file(d / GPT_SUBFOLDER / GPT_WEIGHTS_NAME, f"{what} (gpt/)")
    if not (d / TOKENIZER_SUBFOLDER).is_dir():
        raise ModelFileError(f"{what}: {d} has no {TOKENIZER_SUBFOLDER}/ (the Layton tokenizer it decodes with)")
    return index


def save_laytongen(directory: str | Path, gpt: GPT, *, text_encoder: str | Path, tokenizer, image_size: int,
                   sampling: dict) -> Path:
    """Write a LaytonGen directory: the GPT, a copy of the tokenizer (a tokenizer directory's path,
    or a `LaytonTokenizer`, which is saved), then the index. Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / INDEX_NAME).unlink(missing_ok=True)  # overwritten parts must not sit under a stale index
    gpt.save_pretrained(d / GPT_SUBFOLDER)
    if isinstance(tokenizer, LaytonTokenizer):
        tokenizer.save_pretrained(d / TOKENIZER_SUBFOLDER)
    elif is_uri(tokenizer) or Path(tokenizer).resolve() != (d / TOKENIZER_SUBFOLDER).resolve():
        copy_tokenizer(tokenizer, d / TOKENIZER_SUBFOLDER)  # a URI: from its local copy
    index = {"_class_name": CLASS_NAME, "format": FORMAT,
             GPT_SUBFOLDER: [GPT.__module__, GPT.__name__], TOKENIZER_SUBFOLDER: ["layton.tokenizer", "LaytonTokenizer"],
             "text_encoder": _abs(text_encoder), "image_size": image_size, "sampling": dict(sampling)}
    tmp = d / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, d / INDEX_NAME)
    return d


def gpt_directory(path: str | Path) -> Path | None:
    """Where the GPT of `path` is: the `gpt/` of a LaytonGen directory, or `path` itself when it is a
    GPT directory (config.json + model.safetensors); None for anything else (e.g. a LlamaGen .pt)."""
    p = local_copy(path, "LaytonGen")
    if (p / INDEX_NAME).is_file():
        read_laytongen_index(p)
        return p / GPT_SUBFOLDER
    return p if (p / GPT_CONFIG_NAME).is_file() else None


def load_gpt_state_dict(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The GPT weights of a LaytonGen directory (resuming training from a checkpoint)."""
    from safetensors.torch import load_file

    read_laytongen_index(directory, "LaytonGen checkpoint")
    return load_file(Path(directory) / GPT_SUBFOLDER / GPT_WEIGHTS_NAME, device=str(device))


class LaytonGenPipeline:
    def __init__(self, gpt: GPT, text_encoder, tokenizer, spec: dict, dtype: torch.dtype = torch.float32):
        self.gpt, self.text_encoder, self.tokenizer, self.spec = gpt, text_encoder, tokenizer, spec
        self.dtype = dtype  # sampling and decoding run under autocast to it (a no-op for float32)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu", *, text_encoder: str | None = None,
                        tokenizer: str | None = None, tokenizer_kwargs: dict | None = None,
                        decoder: bool = True, dtype: torch.dtype = torch.float32, accel=None) -> LaytonGenPipeline:
        """Load a LaytonGen directory. `text_encoder` overrides a moved text encoder; `tokenizer` decodes
        with another tokenizer directory than the one held in `tokenizer/`; `tokenizer_kwargs` go to
        `LaytonTokenizer.from_pretrained` (e.g. `sdxl=`, `vq=` when the upstream weights moved);
        `decoder=False` loads no Layton decoder (token ids only). `dtype`: the GPT's and the decoder's
        weights (see `layton.devices.pick_dtype`); `accel`: a `layton.config.Acceleration` for both."""
        d = local_copy(directory, "LaytonGen directory")
        index = read_laytongen_index(d)
        spec = {"text_encoder": text_encoder or index["text_encoder"], "tokenizer": str(tokenizer or d / TOKENIZER_SUBFOLDER),
                "image_size": index["image_size"], "sampling": index.get("sampling", {})}
        gpt = GPT.from_pretrained(d / GPT_SUBFOLDER).to(device, dtype)
        gpt.rope = gpt.rope.float()  # the rotary table stays float32 (LlamaGen computes RoPE in float32)
        if accel is not None:
            accelerate_gpt(gpt, accel)
        t5 = T5TextEncoder(spec["text_encoder"], device=device)
        if t5.dim != gpt.config.caption_dim:
            raise ValueError(f"text encoder {spec['text_encoder']} gives {t5.dim}-d features; the GPT takes {gpt.config.caption_dim}")
        tok_kw = {"dtype": dtype, "accel": accel, **(tokenizer_kwargs or {})}
        tok = LaytonTokenizer.from_pretrained(spec["tokenizer"], **tok_kw).to(device) if decoder else None
        return cls(gpt, t5, tok, spec, dtype)

    def default_params(self, **overrides) -> SamplingParams:
        s = self.spec.get("sampling", {})
        kw = {k: s[k] for k in ("cfg_scale", "temperature", "top_k", "top_p") if k in s}
        return SamplingParams(**{**kw, **{k: v for k, v in overrides.items() if v is not None}})

    def captions(self, prompts: list[str]):
        """Left-padded T5 captions; empty prompts get the unconditional caption (all rows valid)."""
        feats = self.text_encoder.encode(prompts)
        caption, mask = feats.features.clone(), feats.mask.clone()
        empty = torch.tensor([not p.strip() for p in prompts])
        if empty.any():
            caption[empty] = self.gpt.cls_embedding.uncond_embedding.float().cpu()
            mask[empty] = True
        return caption, mask, empty, feats

    @torch.no_grad()
    def generate_tokens(self, prompts: list[str], seeds: list[int], params: SamplingParams | None = None):
        """Token ids (B, h, w) plus per-prompt flags (unconditional, truncated, text tokens)."""
        params = params or self.default_params()
        caption, mask, empty, feats = self.captions(prompts)
        g = self.gpt.config.grid
        # No guidance for an empty prompt (ℓ_c = ℓ_u) nor at cfg_scale <= 1 (LlamaGen's rule, see
        # `gpt_sampling.guides`): such rows sample from the conditional pass alone.
        rows_cfg = [i for i in range(len(prompts)) if not empty[i] and guides(params)]
        rows_plain = [i for i in range(len(prompts)) if i not in rows_cfg]
        tokens = torch.empty(len(prompts), g * g, dtype=torch.long)
        for rows, p in ((rows_cfg, params), (rows_plain, SamplingParams(**{**params.__dict__, "cfg_mode": "off"}))):
            if rows:
                idx = torch.tensor(rows)
                with autocast(self.gpt.tok_embeddings.weight.device, self.dtype):  # the text encoder ran outside it
                    tokens[idx] = generate_tokens(self.gpt, caption[idx], mask[idx], [seeds[i] for i in rows], p).cpu()
        return tokens.view(-1, g, g), empty.tolist(), feats

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], seed: int | list[int] = 0, params: SamplingParams | None = None,
                 size: int = 1024, steps: int | None = None) -> list[Generated]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        tokens, empty, feats = self.generate_tokens(prompts, seeds, params)
        images = [None] * len(prompts)
        if self.tokenizer is not None:
            # One decode per image, each with its prompt's seed: an image never depends on its batch.
            with autocast(self.tokenizer.device, self.dtype):
                images = [self.tokenizer.decode(t[None].to(self.tokenizer.device), size=size, steps=steps, seed=s)[0]
                          for t, s in zip(tokens, seeds)]
        return [Generated(p, s, t, img, e, tr, n)
                for p, s, t, img, e, tr, n in zip(prompts, seeds, tokens, images, empty, feats.truncated, feats.n_tokens)]


def convert_legacy_laytongen(src: str | Path, dst: str | Path, *, tokenizer: str | Path | None = None) -> Path:
    """Re-save a first-layout LaytonGen directory (`laytongen.json` + the GPT's config.json and
    model.safetensors) in the `model_index.json` layout at `dst`. The tokenizer it names by path
    (or `tokenizer`, when that moved) is copied into `dst/tokenizer/`, converted first if it is in the
    old tokenizer layout. Only safetensors and JSON are read. Returns `dst`."""
    src, dst = Path(src), Path(dst)
    spec_path = check_file(src / LEGACY_SPEC_NAME, "legacy LaytonGen directory")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != LEGACY_FORMAT:
        raise ModelFileError(f"legacy LaytonGen directory: {spec_path} has format {spec.get('format')!r}, expected {LEGACY_FORMAT!r}")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"convert laytongen: {dst} exists and is not empty")
    gpt = GPT.from_pretrained(src)
    tok = Path(tokenizer or spec["tokenizer"])
    if not (tok / TOKENIZER_INDEX).is_file():  # an old-layout tokenizer: converted straight into place
        try:
            tok = convert_legacy_tokenizer(tok, dst / TOKENIZER_SUBFOLDER)
        except ModelFileError as e:
            raise ModelFileError(f"legacy LaytonGen directory: cannot take its tokenizer {tok} (from {spec_path}; "
                                 f"pass tokenizer= where it is now): {e}") from None
    return save_laytongen(dst, gpt, text_encoder=spec["text_encoder"], tokenizer=tok, image_size=spec["image_size"],
                          sampling=spec.get("sampling", {}))
