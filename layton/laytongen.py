"""LaytonGen text -> image: flan-t5 features -> GPT samples image tokens with CFG -> Layton decoder.

A LaytonGen directory (what training exports) holds the GPT and names the frozen parts by path:

    config.json, model.safetensors   the GPT (`layton.gpt.GPT.save_pretrained`)
    laytongen.json                   text encoder and tokenizer paths, image_size (encoder px),
                                     default sampling settings

Prompt rules: a prompt is lower-cased and stripped (LlamaGen's preprocessing); an empty prompt is
sampled unconditionally (the GPT's unconditional caption, no guidance); a prompt longer than 120
T5 tokens is truncated to 120 (the result says `truncated`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from layton.gpt import GPT
from layton.gpt_sampling import SamplingParams, generate_tokens
from layton.model_files import check_file

SPEC_NAME = "laytongen.json"
FORMAT = "laytongen/1"


@dataclass
class Generated:
    prompt: str
    seed: int
    tokens: torch.Tensor  # (h, w) image token ids
    image: Image.Image | None
    unconditional: bool  # the prompt was empty
    truncated: bool  # the prompt was cut to 120 T5 tokens
    text_tokens: int


def write_spec(directory: Path, text_encoder: str, tokenizer: str, image_size: int, sampling: dict) -> None:
    spec = {"format": FORMAT, "text_encoder": str(Path(text_encoder).resolve()), "tokenizer": str(Path(tokenizer).resolve()),
            "image_size": image_size, "sampling": sampling}
    (Path(directory) / SPEC_NAME).write_text(json.dumps(spec, indent=1))


class LaytonGenPipeline:
    def __init__(self, gpt: GPT, text_encoder, tokenizer, spec: dict):
        self.gpt, self.text_encoder, self.tokenizer, self.spec = gpt, text_encoder, tokenizer, spec

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu", *, text_encoder: str | None = None,
                        tokenizer: str | None = None, decoder: bool = True) -> LaytonGenPipeline:
        """Load a LaytonGen directory; `text_encoder` / `tokenizer` override moved paths; `decoder=False`
        loads no Layton decoder (token ids only)."""
        from layton.text_encoder import T5TextEncoder
        from layton.tokenizer import LaytonTokenizer

        d = Path(directory)
        spec = json.loads(check_file(d / SPEC_NAME, "LaytonGen directory").read_text())
        if spec.get("format") != FORMAT:
            raise ValueError(f"{d / SPEC_NAME}: format {spec.get('format')!r}, expected {FORMAT!r}")
        spec = {**spec, "text_encoder": text_encoder or spec["text_encoder"], "tokenizer": tokenizer or spec["tokenizer"]}
        gpt = GPT.from_pretrained(d).to(device)
        t5 = T5TextEncoder(spec["text_encoder"], device=device)
        if t5.dim != gpt.config.caption_dim:
            raise ValueError(f"text encoder {spec['text_encoder']} gives {t5.dim}-d features; the GPT takes {gpt.config.caption_dim}")
        tok = LaytonTokenizer.from_pretrained(spec["tokenizer"]).to(device) if decoder else None
        return cls(gpt, t5, tok, spec)

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
        # Guidance is pointless at scale 1 and for an empty prompt: such rows sample from one pass.
        rows_cfg = [i for i in range(len(prompts)) if not empty[i] and params.cfg_scale != 1.0]
        rows_plain = [i for i in range(len(prompts)) if i not in rows_cfg]
        tokens = torch.empty(len(prompts), g * g, dtype=torch.long)
        for rows, p in ((rows_cfg, params), (rows_plain, SamplingParams(**{**params.__dict__, "cfg_mode": "off"}))):
            if rows:
                idx = torch.tensor(rows)
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
            images = [self.tokenizer.decode(t[None].to(self.tokenizer.device), size=size, steps=steps, seed=s)[0]
                      for t, s in zip(tokens, seeds)]
        return [Generated(p, s, t, img, e, tr, n)
                for p, s, t, img, e, tr, n in zip(prompts, seeds, tokens, images, empty, feats.truncated, feats.n_tokens)]
