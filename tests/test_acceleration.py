"""GPU speed options (`layton.config.Acceleration`, `layton.acceleration`): every code path on CPU.

Each option must give what the plain path gives, up to float rounding (VAE tiling: up to its seam
blending), and be set from config where the stage builds its model: the FLUX generation actor, the
tokenizer's training task and decoder, LaytonGen's training task and sampling pipeline. Compile runs
with dynamo's "eager" backend here (the same tracing, guards and in-place wrapping; inductor's C++
codegen would take minutes on 2 cores): `-m gpu` runs belong to the benchmarks.
"""

from __future__ import annotations


import pytest
import torch
import yaml
from safetensors import safe_open

import layton.acceleration as acc
from layton.acceleration import accelerate_gpt, accelerate_tokenizer, autocast, is_compiled, set_attention
from layton.completion import fingerprint
from layton.config import Acceleration, ConfigError, load_config
from layton.gpt import GPT, GPTConfig
from layton.gpt_sampling import SamplingParams, generate_tokens
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def eager_compile(monkeypatch):
    monkeypatch.setattr(acc, "COMPILE_BACKEND", "eager")
    yield
    torch._dynamo.reset()


def _processors(module) -> set[str]:
    return {type(p).__name__ for p in module.attn_processors.values()}


# --- config ----------------------------------------------------------------------------------------


def test_accel_sections_validate_and_unknown_keys_fail(tmp_path):
    from stages.laytongen.config import GenTrainConfig
    from stages.synth.config import SynthConfig
    from stages.tokenizer.config import TokenizerTrainConfig

    def load(name: str, cls, edit):
        raw = yaml.safe_load((ROOT / "workflows" / name).read_text())
        edit(raw)
        p = tmp_path / name
        p.write_text(yaml.safe_dump(raw))
        return load_config(p, cls)

    on = {"compile": True, "compile_mode": "max-autotune", "attention": "eager", "channels_last": True,
          "vae_slicing": True, "vae_tiling": True, "vae_tile_size": 256}
    tok = load("tokenizer_demo.yaml", TokenizerTrainConfig, lambda r: r["stage2"].update(accel=on))
    assert tok.stage2.accel == Acceleration(**on) and tok.stage1.accel == Acceleration()
    synth = load("synth_demo.yaml", SynthConfig, lambda r: r["generation"].update(accel={"compile": True}))
    assert synth.generation.accel.compile
    gen = load("gen_demo.yaml", GenTrainConfig, lambda r: (r["train"].update(accel={"compile": True}),
                                                           r.setdefault("sampling", {}).update(dtype="bfloat16", accel={"attention": "eager"})))
    assert gen.train.accel.compile and gen.sampling.accel.attention == "eager" and gen.sampling.dtype == "bfloat16"
    # Speed only: a run resumes whatever its accel says.
    assert fingerprint(tok) == fingerprint(tok.model_copy(update={"stage2": tok.stage2.model_copy(update={"accel": Acceleration()})}))

    for edit, field in [(lambda r: r["stage2"].update(accel={"compiled": True}), "stage2.accel.compiled"),
                        (lambda r: r["stage2"].update(accel={"attention": "flash"}), "stage2.accel.attention"),
                        (lambda r: r["stage2"].update(accel={"vae_tile_size": 100}), "stage2.accel.vae_tile_size"),
                        (lambda r: r["stage2"].update(vae_slicing=True), "stage2.vae_slicing")]:  # moved into accel
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load("tokenizer_demo.yaml", TokenizerTrainConfig, edit)


def test_bundled_files_still_validate():
    from app.workflow import load_workflow
    from stages.tokenizer.config import TokenizerTrainConfig

    real = load_config(ROOT / "workflows" / "tokenizer_sdxl.yaml", TokenizerTrainConfig)
    assert real.stage2.accel.vae_slicing and not real.stage1.accel.vae_slicing
    paper = load_workflow(ROOT / "workflows" / "paper.yaml")
    assert paper.configs["tokenizer"].stage2.accel.vae_slicing
    load_workflow(ROOT / "workflows" / "demo.yaml")


# --- the GPT -------------------------------------------------------------------------------------


def tiny_gpt(seed: int = 0) -> GPT:
    cfg = GPTConfig(dim=32, n_layer=2, n_head=2, vocab_size=64, caption_dim=16, cls_token_num=8, block_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gpt = GPT(cfg)
        torch.nn.init.normal_(gpt.output.weight, std=0.5)  # LlamaGen's init zeroes the head: logits all equal
    return gpt.eval()


def gpt_inputs():
    g = torch.Generator().manual_seed(1)
    caption = torch.randn(3, 8, 16, generator=g)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :5] = mask[1, :2] = False  # left padding
    return torch.randint(0, 64, (3, 15), generator=g), caption, mask


def test_gpt_eager_attention_equals_sdpa():
    gpt, (idx, caption, mask) = tiny_gpt(), gpt_inputs()
    ref = gpt(idx, caption, mask)
    tokens = generate_tokens(gpt, caption, mask, [1, 2, 3], SamplingParams(cfg_scale=4.0, top_k=0))
    assert set_attention(gpt, "eager") == 2 and not any(layer.attention.sdpa for layer in gpt.layers)
    torch.testing.assert_close(gpt(idx, caption, mask), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate_tokens(gpt, caption, mask, [1, 2, 3], SamplingParams(cfg_scale=4.0, top_k=0)), tokens)


def test_gpt_compile_keeps_results_and_clean_checkpoints(tmp_path):
    idx, caption, mask = gpt_inputs()
    plain = tiny_gpt()
    ref, ref_tokens = plain(idx, caption, mask), generate_tokens(plain, caption, mask, [1, 2, 3], SamplingParams(top_k=0))

    train = accelerate_gpt(tiny_gpt(), Acceleration(compile=True), training=True)  # the whole forward
    assert is_compiled(train) and type(train) is GPT
    torch.testing.assert_close(train(idx, caption, mask), ref, rtol=1e-5, atol=1e-5)
    loss = train.train()(idx, caption, mask, torch.zeros(3, dtype=torch.bool)).logsumexp(-1).mean()
    loss.backward()  # compiled backward
    assert train.output.weight.grad is not None
    assert list(train.state_dict()) == list(plain.state_dict())
    train.save_pretrained(tmp_path / "gpt")
    with safe_open(tmp_path / "gpt" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(plain.state_dict()) and not any("_orig_mod" in k for k in f.keys())
    GPT.from_pretrained(tmp_path / "gpt")  # loads strictly

    sample = accelerate_gpt(tiny_gpt(), Acceleration(compile=True))  # sampling: each block's feed-forward
    assert all(is_compiled(layer.feed_forward) for layer in sample.layers)
    assert torch.equal(generate_tokens(sample, caption, mask, [1, 2, 3], SamplingParams(top_k=0)), ref_tokens)


# --- FLUX (the synthesis generation actor) ------------------------------------------------------


def test_flux_generation_actor_applies_accel(tiny_zoo):
    from pipelines.stages import GenerateStage

    cfg = dict(model=str(tiny_zoo / "flux"), height=32, width=32, num_inference_steps=2, max_sequence_length=16,
               batch_size=2, dtype="float32")
    prompts, seeds = ["a red cube", "a cat on a sofa"], [3, 4]
    ref = GenerateStage(cfg).generate(prompts, seeds)
    accel = dict(attention="eager", channels_last=True, vae_slicing=True, vae_tiling=True, vae_tile_size=64, compile=True)
    stage = GenerateStage({**cfg, "accel": accel})
    pipe = stage.pipe
    backends = {p._attention_backend.value for p in pipe.transformer.attn_processors.values()}
    assert backends == {"_native_math"} and _processors(pipe.vae) == {"AttnProcessor"}
    assert is_compiled(pipe.transformer) and pipe.vae.use_slicing and pipe.vae.use_tiling
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = stage.generate(prompts, seeds)  # 32 px: under the 64 px tile, so tiling leaves it alone
    assert out.shape == ref.shape and int(abs(out.astype(int) - ref.astype(int)).max()) <= 1


# --- the tokenizer: LADD's UNet and ControlNet copy, the SDXL VAE --------------------------------


@pytest.fixture(scope="module")
def tok_dir(tiny_zoo, tmp_path_factory):
    from layton.tokenizer import LaytonTokenizer
    from stages.tokenizer.config import TokenizerModelConfig

    cfg = TokenizerModelConfig(vq=str(tiny_zoo / "llamagen_vq" / "vq_ds16_t2i.pt"), sdxl=str(tiny_zoo / "sdxl"), embedder_channels=[32])
    tok = LaytonTokenizer.build(cfg)
    with torch.no_grad():  # non-zero residuals: the trainable copy takes part in the output
        tok.ladd.controlnet.controlnet_mid_block.weight.normal_(0, 0.05)
        tok.ladd.cond_embedder.conv_out.weight.normal_(0, 0.05)
    return tok.save_pretrained(tmp_path_factory.mktemp("tok") / "tok", stage=1)


IDS = torch.randint(0, 1024, (2, 4, 4), generator=torch.Generator().manual_seed(0))


def _decode(tok, size: int = 64) -> torch.Tensor:
    return tok.decode_tensor(IDS, size=size, steps=2, seed=0)


def test_tokenizer_decode_options_match_plain(tok_dir, tmp_path):
    from layton.tokenizer import LaytonTokenizer

    ref = _decode(LaytonTokenizer.from_pretrained(tok_dir))
    tok = LaytonTokenizer.from_pretrained(tok_dir, accel=Acceleration(attention="eager", channels_last=True, vae_slicing=True,
                                                                     compile=True))
    assert _processors(tok.ladd.unet) == _processors(tok.ladd.controlnet) == _processors(tok.vae) == {"AttnProcessor"}
    assert is_compiled(tok.ladd.unet) and is_compiled(tok.ladd.controlnet) and tok.vae.use_slicing
    assert tok.ladd.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_decode(tok), ref, rtol=1e-4, atol=1e-4)
    # Checkpoints of the compiled, channels_last copy: the plain keys, contiguous on disk, loadable.
    tok.save_pretrained(tmp_path / "saved", stage=1)
    with safe_open(tmp_path / "saved" / "controlnet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert set(f.keys()) == set(tok.ladd.controlnet.state_dict()) and not any("_orig_mod" in k for k in f.keys())
    torch.testing.assert_close(_decode(LaytonTokenizer.from_pretrained(tmp_path / "saved")), ref, rtol=1e-4, atol=1e-4)


def test_vae_tiling_is_used_at_the_tile_size(tok_dir):
    """Tiles of `vae_tile_size` px, whatever the VAE's sample_size. The tiny VAE's random weights and
    per-tile GroupNorm statistics make a tiled image differ a lot from the whole one (a real SDXL VAE
    shows seams only), so the check is structural: the decoder sees only tiles, and the first tile's
    unblended part is exactly that tile decoded alone."""
    from layton.tokenizer import LaytonTokenizer

    tok = LaytonTokenizer.from_pretrained(tok_dir)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # 256 px; the VAE's sample_size is 128
    ref = tok.vae_decode(z)
    calls = []
    tok.vae.decoder.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[-2:])))
    accelerate_tokenizer(tok, Acceleration(vae_tiling=True, vae_tile_size=64))
    assert tok.vae.use_tiling and tok.vae.tile_sample_min_size == 64 and tok.vae.tile_latent_min_size == 8
    out = tok.vae_decode(z)
    assert calls and max(calls) <= (8, 8)  # the decoder saw 8x8 latent tiles (64 px), never the whole latent
    assert out.shape == ref.shape and torch.isfinite(out).all()
    calls.clear()
    first = tok.vae_decode(z[..., :8, :8])  # one tile: under the tile size, decoded whole
    assert calls == [(8, 8)]
    keep = 64 - 64 // 4  # diffusers blends the last quarter of a tile into its neighbours
    torch.testing.assert_close(out[..., :keep, :keep], first[..., :keep, :keep], rtol=1e-5, atol=1e-5)
    accelerate_tokenizer(tok, Acceleration())
    assert not tok.vae.use_tiling


def test_tokenizer_training_task_applies_accel(tiny_zoo, tmp_path):
    from stages.tokenizer.config import TokenizerTrainConfig
    from tests.tokenizer.conftest import tokenizer_config_dict
    from workflows.train_common import Worker
    from workflows.train_tokenizer import TokenizerTask

    raw = tokenizer_config_dict(tiny_zoo, tmp_path / "shards", tmp_path / "runs")
    raw["stage1"]["accel"] = {"attention": "eager", "channels_last": True, "vae_slicing": True, "compile": True}
    task = TokenizerTask(TokenizerTrainConfig.model_validate(raw), 1, Worker(0, 1, torch.device("cpu")))
    ladd = task.tok.ladd
    assert task.module is ladd and type(ladd.controlnet).__name__ == "LaddControlNet"  # compiled in place, not wrapped
    assert is_compiled(ladd.unet) and is_compiled(ladd.controlnet) and task.tok.vae.use_slicing
    assert _processors(ladd.unet) == {"AttnProcessor"}
    assert ladd.controlnet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert {id(p) for p in task.params} == {id(p) for p in ladd.trainable_parameters()}
    assert not any("_orig_mod" in k for k in ladd.trainable_state_dict())


# --- LaytonGen: training task and sampling pipeline ---------------------------------------------


def test_gen_training_task_applies_accel(tmp_path):
    from stages.laytongen.config import GenTrainConfig
    from workflows.train_common import Worker
    from workflows.train_gen import GenTask

    raw = yaml.safe_load((ROOT / "workflows" / "gen_demo.yaml").read_text())
    raw["model"].update(gpt={"size": None, "n_layer": 1, "n_head": 2, "dim": 32}, init_from=None)
    raw["train"]["accel"] = {"compile": True, "attention": "eager"}
    task = GenTask(GenTrainConfig.model_validate(raw), 64, 16, Worker(0, 1, torch.device("cpu")))
    assert is_compiled(task.gpt) and task.module is task.gpt and not task.gpt.layers[0].attention.sdpa
    assert "accel" not in task.spec["sampling"]  # speed settings stay out of the exported LaytonGen index


@pytest.fixture(scope="module")
def laytongen_dir(tiny_zoo, tok_dir, tmp_path_factory):
    from layton.laytongen import save_laytongen

    gpt = GPT.from_pretrained(tiny_zoo / "llamagen_gpt" / "gpt")
    return save_laytongen(tmp_path_factory.mktemp("lg") / "lg", gpt, text_encoder=tiny_zoo / "flan-t5-xl", tokenizer=tok_dir,
                          image_size=256, sampling={"cfg_scale": 4.0, "top_k": 50})


def test_laytongen_sampling_accel_and_bf16(laytongen_dir):
    from layton.laytongen import LaytonGenPipeline

    prompts = ["a red fire hydrant", ""]
    ref = LaytonGenPipeline.from_pretrained(laytongen_dir)(prompts, seed=0, size=64, steps=2)
    # (compile of the GPT's sampling path and of the decoder: the tests above)
    pipe = LaytonGenPipeline.from_pretrained(laytongen_dir, accel=Acceleration(attention="eager", channels_last=True))
    assert not pipe.gpt.layers[0].attention.sdpa and _processors(pipe.tokenizer.ladd.unet) == {"AttnProcessor"}
    out = pipe(prompts, seed=0, size=64, steps=2)
    for a, b in zip(out, ref):
        assert torch.equal(a.tokens, b.tokens)
        assert abs(torch.tensor(list(a.image.getdata())) - torch.tensor(list(b.image.getdata()))).max() <= 1

    # bfloat16 weights (what `sampling.dtype` gives on CUDA), sampled under autocast. The decoder's
    # antialiased resize has no bfloat16 CPU kernel: its half-precision decode runs on GPUs only.
    half = LaytonGenPipeline.from_pretrained(laytongen_dir, dtype=torch.bfloat16, decoder=False)
    assert half.gpt.tok_embeddings.weight.dtype == torch.bfloat16 and half.gpt.rope.dtype == torch.float32
    tokens, _, _ = half.generate_tokens(prompts, [0, 1])
    assert tokens.shape == (2, 16, 16) and int(tokens.max()) < 1024


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_laytongen_bf16_decode_on_gpu(laytongen_dir):
    from layton.laytongen import LaytonGenPipeline

    pipe = LaytonGenPipeline.from_pretrained(laytongen_dir, device="cuda", dtype=torch.bfloat16)
    assert pipe.tokenizer.ladd.unet.dtype == torch.bfloat16 and pipe.tokenizer.vae.dtype == torch.bfloat16
    (r,) = pipe(["a red fire hydrant"], seed=0, size=64, steps=2)
    assert r.image.size == (64, 64)


def test_autocast_is_off_for_float32():
    assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_generate_job_and_recon_eval_take_accel(tiny_zoo, laytongen_dir, tmp_path):
    from pipelines.generate import GenerateSettings, LaytonGenWriter
    from stages.eval_recon.config import ReconModelConfig
    from workflows.eval_recon import _load_reconstructor

    writer = LaytonGenWriter(str(laytongen_dir), vars(GenerateSettings(size=64, dtype="bfloat16")), str(tmp_path), device="cpu",
                             accel={"attention": "eager", "vae_slicing": True})
    assert not writer.pipe.gpt.layers[0].attention.sdpa and writer.pipe.tokenizer.vae.use_slicing
    assert writer.pipe.gpt.tok_embeddings.weight.dtype == torch.float32  # bfloat16 is for GPUs: CPU runs float32
    vae = _load_reconstructor(ReconModelConfig(name="vae", kind="sdxl_vae", path=str(tiny_zoo / "sdxl"),
                                               accel={"vae_tiling": True, "attention": "eager"}), torch.device("cpu"))
    assert vae.use_tiling and vae.tile_sample_min_size == 512 and _processors(vae) == {"AttnProcessor"}
