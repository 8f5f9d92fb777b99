"""LaytonGen learns: a tiny GPT trained with the Ray Train loop's loss (`workflows.train_gen.gen_loss`)
on a synthetic token corpus with caption-dependent structure.

Corpus: 8 captions (fixed random T5-like features, different valid lengths, left-padded as the text
pass stores them), each with its own 256-token sequence over a 1024-code vocabulary: a random walk
on the code ids with a per-caption drift and a random step of -1/0/+1 (mod 1024). Which walk, and
where it starts, only the caption says; the rest is learnable from the caption and the prefix.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from layton.gpt import GPT, GPTConfig
from layton.text_encoder import pad_valid_tokens
from workflows.train_gen import Batch, gen_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, N_TOKENS, N_CAPTIONS, CAPTION_DIM = 1024, 256, 8, 16
VALID = [3, 9, 17, 30, 48, 64, 90, 120]
STEPS = 50  # a fixed count (deterministic); ~15 s on one thread of the 2-core test machine
CAPTION_DROPOUT = 0.1


def corpus() -> Batch:
    g = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(N_CAPTIONS):
        start = torch.randint(0, VOCAB, (1,), generator=g)
        drift = torch.randint(-6, 7, (1,), generator=g)
        steps = drift + torch.randint(-1, 2, (N_TOKENS,), generator=g)
        steps[0] = 0
        seqs.append((start + steps.cumsum(0)) % VOCAB)
    idx = torch.stack(seqs)
    caption, mask = pad_valid_tokens([torch.randn(n, CAPTION_DIM, generator=g) for n in VALID])
    return Batch(idx, caption, mask, 0)


def evaluate(model: GPT, b: Batch, drop_all: bool) -> tuple[float, float]:
    """(CE over all tokens via gen_loss, CE of token 0 alone) in eval mode."""
    was = model.training
    model.eval()
    drop = torch.full((b.idx.shape[0],), drop_all)
    with torch.no_grad():
        ce = gen_loss(model, b, drop).item()
        logits = model(b.idx[:, :-1], b.caption, b.mask, drop)
        first = F.cross_entropy(logits[:, 0].float(), b.idx[:, 0]).item()
    model.train(was)
    return ce, first


def test_tiny_gpt_learns_the_corpus():
    b = corpus()
    assert b.mask.sum(1).tolist() == VALID and not b.mask[:, 0].all()  # left-padded, ragged
    cfg = GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=VOCAB, caption_dim=CAPTION_DIM, block_size=N_TOKENS,
                    token_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                    caption_dropout_p=CAPTION_DROPOUT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0)
    ce_start, _ = evaluate(model, b, False)
    assert ce_start == pytest.approx(math.log(VOCAB), abs=1e-4)  # LlamaGen's zero-initialised logits head

    drops = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    losses = []
    for _ in range(STEPS):
        drop = torch.rand(N_CAPTIONS, generator=drops) < cfg.caption_dropout_p  # as train_loop draws it
        loss = gen_loss(model, b, drop)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0

    ce_cond, first_cond = evaluate(model, b, False)
    ce_uncond, first_uncond = evaluate(model, b, True)
    print(f"\nLaytonGen tiny: {STEPS} steps in {seconds:.1f} s; CE start {ce_start:.4f} (log V {math.log(VOCAB):.4f}), "
          f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}; eval CE conditional {ce_cond:.4f}, unconditional "
          f"{ce_uncond:.4f}; token-0 CE conditional {first_cond:.3f}, unconditional {first_uncond:.3f}")

    assert all(math.isfinite(x) for x in losses)
    assert ce_cond < 0.5 * math.log(VOCAB), ce_cond
    # the caption matters: without it the model does worse, above all on token 0, which only the caption determines
    assert ce_uncond > ce_cond
    assert first_uncond > first_cond + 1.0, (first_cond, first_uncond)
