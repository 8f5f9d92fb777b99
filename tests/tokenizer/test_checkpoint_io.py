"""Training state round trip through safetensors + JSON; a tokenizer checkpoint's trained weights on resume."""

from __future__ import annotations

import json

import pytest
import torch

from layton.checkpoint_io import STATE_NAME, load_training_state, save_training_state


def _trained(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_optimizer_and_schedule_round_trip(tmp_path):
    model, opt, sched = _trained(0)
    save_training_state(tmp_path, opt, sched, {"step": 3, "stage": 1})
    _, opt2, sched2 = _trained(1)  # different moments, to be overwritten
    state = load_training_state(tmp_path, opt2, sched2)
    assert state == {"step": 3, "stage": 1}
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx in a["state"]:
        for name, value in a["state"][idx].items():
            assert torch.equal(value, b["state"][idx][name]), (idx, name)
    assert sched2.state_dict()["last_epoch"] == 3
    assert "step" in json.loads((tmp_path / STATE_NAME).read_text())


def test_incomplete_checkpoint_is_refused(tmp_path):
    _, opt, sched = _trained(0)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_training_state(tmp_path, opt, sched)


def test_tokenizer_checkpoint_resumes_into_the_training_modules(tiny_zoo, tmp_path):
    """`LaytonTokenizer.load_trained(dir)` (the resume path of tokenizer training) puts a checkpoint's
    trained weights into the modules the optimizer already holds."""
    from stages.tokenizer.config import TokenizerModelConfig
    from layton.tokenizer import LaytonTokenizer

    cfg = TokenizerModelConfig(vq=str(tiny_zoo / "llamagen_vq" / "vq_ds16_t2i.pt"), sdxl=str(tiny_zoo / "sdxl"), embedder_channels=[32])
    trained = LaytonTokenizer.build(cfg)
    with torch.no_grad():
        for p in trained.ladd.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    checkpoint = trained.save_pretrained(tmp_path / "checkpoint", stage=1)
    resumed = LaytonTokenizer.build(cfg)
    opt = torch.optim.AdamW(resumed.ladd.trainable_parameters(), lr=1e-3)
    resumed.load_trained(checkpoint)
    got, want = resumed.ladd.trainable_state_dict(), trained.ladd.trainable_state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(a is b for a, b in zip([p for g in opt.param_groups for p in g["params"]], resumed.ladd.trainable_parameters()))
    with pytest.raises(FileNotFoundError, match="not a Layton tokenizer directory"):
        resumed.load_trained(tmp_path / "nowhere")
