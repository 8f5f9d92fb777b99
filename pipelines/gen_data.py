"""Training input for LaytonGen: image tokens from the tokenizer's precompute + flan-t5 text features.

The tokenizer's precompute pass already holds, per image, its caption and the VQ code ids at each
encoder size (`tokens_<S>`). The frozen T5 encoder is the other expensive per-sample computation,
so it runs once here, as a Ray Data actor pool, and training reads parquet with:

    key, caption
    tokens        int16 image token ids, row-major (image_size/16)^2
    text          float16 bytes of the (text_len, D) valid-token T5 features (padding is not stored)
    text_len      valid T5 tokens (</s> included, at most 120)
    truncated     the caption had more than 120 T5 tokens and was cut
    error         why the row is skipped (the image was unreadable, or the caption is empty), else ""

Written by `pipelines.precompute.run_pass`: reused while its settings hold, redone otherwise.
"""

from __future__ import annotations

import numpy as np
import ray

from layton.devices import pick_device
from layton.storage import absolute
from layton.text_encoder import T5TextEncoder
from pipelines.precompute import read_marker, read_pass, run_pass, training_read

PASS_VERSION = 1
EMPTY_CAPTION = "empty caption"


class TextFeatureStage:
    """Ray Data actor: the flan-t5 encoder over captions."""

    def __init__(self, text_encoder: str, token_column: str, device: str = "cpu"):
        self.encoder = T5TextEncoder(text_encoder, device=pick_device(device))
        self.token_column = token_column

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        captions = [str(c) for c in batch["caption"]]
        errors = [str(e) if e else ("" if c.strip() else EMPTY_CAPTION) for e, c in zip(batch["error"], captions)]
        ok = [i for i in range(n) if not errors[i]]
        text = np.array([b""] * n, dtype=object)
        text_len = np.zeros(n, dtype=np.int32)
        truncated = np.zeros(n, dtype=bool)
        if ok:
            rows, cut = self.encoder.encode_valid([captions[i] for i in ok])
            for j, i in enumerate(ok):
                text[i], text_len[i], truncated[i] = rows[j].astype(np.float16).tobytes(), rows[j].shape[0], cut[j]
        return {"key": batch["key"], "caption": np.array(captions, dtype=object),
                "tokens": np.stack([np.asarray(t, dtype=np.int16) for t in batch[self.token_column]]),
                "text": text, "text_len": text_len, "truncated": truncated,
                "error": np.array(errors, dtype=object)}


def check_token_pass(config) -> dict:
    """The tokenizer precompute LaytonGen reads: complete, with captions and this image size's tokens."""
    tokens = config.data.tokens
    marker = read_marker(tokens)
    if marker is None:
        raise FileNotFoundError(f"data.tokens: {tokens} is not a complete tokenizer precompute pass "
                                "(run `layton train tokenizer` with data.precompute: true first)")
    s = marker["settings"]
    size = config.model.image_size
    if size not in s.get("encoder_sizes", []):
        raise ValueError(f"data.tokens: {tokens} has token ids for encoder sizes {s.get('encoder_sizes')}, "
                         f"not model.image_size={size}")
    if s.get("version", 1) < 2:
        raise ValueError(f"data.tokens: {tokens} was written before captions were stored; rerun the tokenizer precompute")
    return marker


def text_precompute(config) -> dict:
    """Run the text pass unless a complete one with the same settings exists. Returns its marker."""
    token_marker = check_token_pass(config)
    column = f"tokens_{config.model.image_size}"
    settings = {"tokens": absolute(config.data.tokens), "tokens_settings": token_marker["settings"],
                "text_encoder": absolute(config.model.text_encoder), "token_column": column,
                "version": PASS_VERSION}
    d = config.data

    def build() -> ray.data.Dataset:
        return read_pass(config.data.tokens, columns=["key", "caption", column, "error"]).map_batches(
            TextFeatureStage,
            fn_constructor_kwargs=dict(text_encoder=config.model.text_encoder, token_column=column,
                                       device="cuda" if d.num_gpus else "cpu"),
            batch_size=16,
            compute=ray.data.ActorPoolStrategy(size=d.num_actors),
            num_gpus=d.num_gpus,
            batch_format="numpy",
        )

    return run_pass(config.text_path(), settings, build)


def read_text_pass(config) -> ray.data.Dataset:
    return read_pass(config.text_path(), **training_read(config.data))
