"""One-GPU figures at the real models' sizes, side by side in one run (random weights, no downloads).

    bash benchmarks/gpu.sh            # one CUDA GPU, <= 8 minutes
    bash benchmarks/gpu.sh --smoke    # every piece on CPU at tiny sizes (the tests run this)

Pieces (each in its own subprocess under a time cap, so one that fails or hangs does not stop the rest;
`--smoke` runs them in one subprocess, each under its own alarm, on CPU at the tiny zoo's sizes: 64² images,
2 steps, float32, torch.compile's "eager" backend, vLLM skipped):

flux  FLUX.1-dev-size pipeline (transformer 19 double + 38 single blocks, 3072 wide; T5-XXL and CLIP-L
      text encoders and the FLUX VAE, all random at their real sizes), 1024², 28 steps, bf16, batch 1:
      s/image through the project's `GenerateStage.process` (called in-process, not via Ray; JPEG
      encoding included) vs diffusers' `FluxPipeline.__call__` on the same pipeline object, interleaved,
      eager and then with `generation.accel.compile` (or, where the stage has no such field yet,
      `pipe.transformer.compile()` applied here, as the output says). The pipeline is built here
      (`from_config` with the configs below) and handed to the stage in place of `from_pretrained`.
ladd  LADD training step at 1024² on an SDXL-size UNet + its ControlNet copy, with the settings of
      workflows/tokenizer_sdxl.yaml (bf16 autocast, frozen parts in bf16, gradient checkpointing,
      Adam, batch 1): the project's `TokenizerTask` loss (stage 1: ε-MSE; stage 2: consistency step +
      SDXL-VAE decode + LPIPS-VGG) and `train_common`'s optimizer/autocast/clip steps; step time and
      torch.cuda.max_memory_allocated. The consistency LoRA is not fused (a fused LoRA costs nothing).
gpt   LaytonGen GPT-XL sampling, 256 tokens, CFG 7.5, batch 1 and 16: KV cache vs full recompute, with
      benchmarks/gen_sampling.py's `Bench`.
vllm  Qwen2-VL-2B-size recaption through vLLM (`load_format="dummy"`): images/s over 1024² JPEGs, with
      the project's request rows (`vllm_preprocess_row`) and engine kwargs (`vllm_processor_config`) and
      the recaption settings of workflows/synth_flux_dev.yaml. The project's own vLLM path is a
      ray.data.llm processor (needs Ray), so vLLM's `LLM.chat` runs the same requests in-process. The
      model directory is a 2B-size config.json beside the tiny zoo's tokenizer and processor files (the
      release's formats and special tokens, a small BPE vocabulary) with the release's pixel budget, so a
      1024² image is 1369 vision tokens as with the real processor. (FLUX's text encoders also take the zoo's
      tokenizers; prompts are padded to 77 / 512 tokens either way, so the compute is the real one.)

Every figure line reads `RESULT <piece>: ... [GPU, torch, CUDA]`; a piece that cannot run prints
`SKIP <piece>: <what it needs>`, one that fails `FAIL <piece>: <error>`. Exit status 0 when no piece
failed. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PIECES = ("flux", "ladd", "gpt", "vllm")
# Seconds per piece; the whole run stops at TOTAL (the 8-minute goal, less start-up).
CAPS = {"flux": 270, "ladd": 80, "gpt": 75, "vllm": 200}
SMOKE_CAPS = {"flux": 60, "ladd": 60, "gpt": 40, "vllm": 30}  # ~45 s in all on 2 quiet cores
TOTAL, SMOKE_TOTAL = 470, 150
VLLM_EXTRA = "pip install '.[gpu]'"  # pyproject's extra holding vllm + ray[llm] + qwen-vl-utils
LINE = re.compile(r"^(RESULT|SKIP|FAIL) (\w+)\b")

# --- the real configs (release config.json values; the tiny zoo supplies tokenizers and schedulers) ---

FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_DEV_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                    force_upcast=True, mid_block_add_attention=True)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, projection_dim=768)  # openai/clip-vit-large-patch14
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128)  # google/t5-v1_1-xxl
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 mid_block_type="UNetMidBlock2DCrossAttn",
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.13025, force_upcast=False)  # madebyollin/sdxl-vae-fp16-fix
QWEN2VL_2B_TEXT = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_window_layers=28,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       layer_types=["full_attention"] * 28,
                       rope_parameters={"mrope_section": [16, 24, 24], "rope_theta": 1e6, "rope_type": "default"})
QWEN2VL_2B_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536)
QWEN2VL_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}  # min_pixels / max_pixels
PROMPTS = ["a lighthouse on a cliff at dawn, oil painting", "a red fox in fresh snow, telephoto photograph"]


class Skip(Exception):
    """A piece that cannot run here; the message says what it needs."""


class PieceTimeout(Exception):
    pass


# --- helpers ---------------------------------------------------------------------------------------


def env_tag() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA)"
    return f"[{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}]"


def result(piece: str, text: str) -> None:
    print(f"RESULT {piece}: {text} {env_tag()}", flush=True)


def setting(a):
    """(device, dtype) of a piece: CUDA bf16, or CPU float32 with --smoke."""
    import torch

    return (torch.device("cpu"), torch.float32) if a.smoke else (torch.device("cuda"), torch.bfloat16)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@contextlib.contextmanager
def materialize(device, dtype):
    """Modules built here get their (random) weights on `device` in `dtype`: no CPU init, no copy."""
    import torch

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(prev)


def parameters(build) -> int:
    """Parameter count of `build()`, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def need_memory(what: str, estimate: float) -> None:
    """Skip when the GPU's free memory is below `estimate` bytes."""
    import torch

    if not torch.cuda.is_available():
        return
    free, total = torch.cuda.mem_get_info()
    if estimate > free:
        raise Skip(f"not enough GPU memory for {what}: needs ~{estimate / 2**30:.0f} GiB, "
                   f"{free / 2**30:.0f} of {total / 2**30:.0f} GiB free")


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def zoo_part(a, name: str) -> Path:
    """A tiny-zoo model directory under --zoo, written on first use (a few seconds each)."""
    from layton import zoo

    writers = {"flux": zoo.write_tiny_flux, "sdxl": zoo.write_tiny_sdxl, "qwen2vl": zoo.write_tiny_qwen2vl}
    path = Path(a.zoo) / name
    if not path.exists():
        tmp = Path(tempfile.mkdtemp(dir=a.zoo))
        writers[name](tmp / name)
        (tmp / name).rename(path)
        tmp.rmdir()
    return path


def project_config(name: str, cls):
    from layton.config import load_config

    return load_config(ROOT / "workflows" / name, cls)


# --- pieces ------------------------------------------------------------------------------------------


def piece_flux(a) -> None:
    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoConfig, CLIPTextModel, T5EncoderModel

    from pipelines.shard_rows import GENERATED, PENDING
    from pipelines.stages import GenerateStage
    from stages.synth.config import GenerationConfig, SynthConfig

    device, dtype = setting(a)
    tiny = zoo_part(a, "flux")
    clip, t5 = AutoConfig.from_pretrained(tiny / "text_encoder"), AutoConfig.from_pretrained(tiny / "text_encoder_2")
    if a.smoke:  # the tiny zoo's own configs
        tcfg = FluxTransformer2DModel.load_config(tiny, subfolder="transformer")
        vcfg = AutoencoderKL.load_config(tiny, subfolder="vae")
    else:  # real sizes; the token ids stay those of the zoo's tokenizers
        tcfg, vcfg = FLUX_DEV_TRANSFORMER, FLUX_DEV_VAE
        clip.update(CLIP_L_TEXT)
        t5.update(T5_XXL)
    builders = {"transformer": lambda: FluxTransformer2DModel.from_config(tcfg), "vae": lambda: AutoencoderKL.from_config(vcfg),
                "text_encoder": lambda: CLIPTextModel(clip), "text_encoder_2": lambda: T5EncoderModel(t5)}
    counts = {k: parameters(b) for k, b in builders.items()}
    need_memory("the FLUX.1-dev-size pipeline", sum(counts.values()) * dtype.itemsize + 12 * 2**30)
    t0 = time.perf_counter()
    with materialize(device, dtype):
        parts = {k: b().eval() for k, b in builders.items()}
    pipe = FluxPipeline.from_pretrained(tiny, **parts)  # only tokenizers + scheduler come from disk
    print("flux: random weights, " + ", ".join(f"{k} {count(n)}" for k, n in counts.items())
          + f" ({'tiny zoo sizes' if a.smoke else 'all at real size'}; tokenizers from the tiny zoo), "
          f"built in {time.perf_counter() - t0:.0f}s", flush=True)

    gen = project_config("synth_flux_dev.yaml", SynthConfig).generation.model_dump(mode="json")
    gen.update(model=str(tiny), batch_size=1, dtype=str(dtype).removeprefix("torch."),
               resources={"device": device.type}, **(dict(height=64, width=64, num_inference_steps=2, max_sequence_length=32)
                                                      if a.smoke else dict(height=1024, width=1024, num_inference_steps=28)))
    wired = "accel" in GenerationConfig.model_fields
    backend = {}
    if a.smoke:  # dynamo traces and guards the same code; inductor's CPU codegen would take minutes on 2 cores
        backend = {"backend": "eager"}
        if wired:
            import layton.acceleration

            layton.acceleration.COMPILE_BACKEND = "eager"
        print("flux: --smoke compiles with torch.compile's 'eager' backend", flush=True)
    if not wired:
        print("flux: GenerationConfig has no `accel` field yet (generation.accel.compile is not wired into "
              "GenerateStage): the compiled run compiles pipe.transformer here instead", flush=True)
    for compiled in (False, True):
        cfg = dict(gen, **({"accel": {**gen["accel"], "compile": compiled}} if wired else {}))
        if compiled and not wired:
            pipe.transformer.compile(**backend)
        with mock.patch.object(FluxPipeline, "from_pretrained", lambda *_, **__: pipe):
            stage = GenerateStage(cfg, image_format="jpg", jpeg_quality=95)  # the synthesis default format
        c = stage.cfg
        call = dict(height=c.height, width=c.width, guidance_scale=c.guidance_scale,
                    max_sequence_length=c.max_sequence_length, output_type="np")

        def direct(i: int, steps: int = c.num_inference_steps) -> None:
            pipe(prompt=[PROMPTS[i % 2]], generator=[torch.Generator(device).manual_seed(i)], num_inference_steps=steps, **call)

        def staged(i: int) -> None:
            row = stage.process({"ids": [str(i)], "prompts": [PROMPTS[i % 2]], "seeds": [i], "status": [PENDING], "reason": [""]})
            if row["status"][0] != GENERATED:
                raise RuntimeError(f"GenerateStage: {row['reason'][0]}")

        warm = timed(lambda: direct(0, steps=min(2, c.num_inference_steps)), device)  # compiles, when compiling
        times = {"stage": [], "diffusers": []}
        for i in range(a.images):  # interleaved: a slow spell hits both
            times["stage"].append(timed(lambda: staged(i), device))
            times["diffusers"].append(timed(lambda: direct(i), device))
        s, d = (statistics.median(times[k]) for k in ("stage", "diffusers"))
        if compiled and getattr(pipe.transformer, "_compiled_call_impl", None) is None:
            raise RuntimeError("generation.accel.compile=true left pipe.transformer uncompiled")
        mode = ("compiled (generation.accel.compile)" if wired else "compiled (pipe.transformer.compile() here)") if compiled else "eager"
        result("flux", f"{mode}, {c.height}x{c.width}, {c.num_inference_steps} steps, {str(dtype)[6:]}, batch 1, "
                       f"median of {a.images}: GenerateStage {s:.2f} s/image ({1 / s:.3f} images/s) vs FluxPipeline.__call__ "
                       f"{d:.2f} s/image ({1 / d:.3f} images/s): stage/diffusers {d / s:.3f}x images/s (goal >= 0.95); "
                       f"warm-up {warm:.0f}s" + (f"; peak {gib(torch.cuda.max_memory_allocated())}" if device.type == "cuda" else ""))


def piece_ladd(a) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from layton.ladd import LADD
    from layton.tokenizer import LaytonTokenizer
    from layton.vq import VQConfig, VQModel
    from layton.zoo.llamagen_vq import TINY
    from layton.zoo.lpips_backbone import write_tiny_lpips_backbone
    from layton.zoo.sdxl import SDXL_SCHEDULER
    from stages.tokenizer.config import TokenizerTrainConfig
    from workflows import train_tokenizer as tt
    from workflows.train_common import Worker, autocast, build_optimizer, clip_and_step, step_generator

    device, _ = setting(a)
    config = project_config("tokenizer_sdxl.yaml", TokenizerTrainConfig)
    lpips = config.stage2.lpips  # a random backbone of the configured net (the real architecture)
    backbone = write_tiny_lpips_backbone(Path(a.zoo) / "lpips", net=lpips.net)
    config = config.model_copy(update={"stage2": config.stage2.model_copy(
        update={"lpips": lpips.model_copy(update={"backbone": str(backbone)})})})
    if a.smoke:
        sdxl = zoo_part(a, "sdxl")
        ucfg, vcfg = UNet2DConditionModel.load_config(sdxl, subfolder="unet"), AutoencoderKL.load_config(sdxl, subfolder="vae")
        qcfg, px = VQConfig(**TINY), 64
        config = config.model_copy(update={"model": config.model.model_copy(update={"embedder_channels": [32]})})  # the demo's
    else:
        ucfg, vcfg, qcfg, px = SDXL_UNET, SDXL_VAE, VQConfig(), 1024

    def build() -> LaytonTokenizer:
        unet = UNet2DConditionModel.from_config(ucfg)
        u = unet.config
        pooled = u.projection_class_embeddings_input_dim - 6 * u.addition_time_embed_dim
        ladd = LADD.from_unet(unet, qcfg.codebook_embed_dim, config.model.embedder_channels,
                              torch.zeros(1, 77, u.cross_attention_dim), torch.zeros(1, pooled))
        return LaytonTokenizer(VQModel(qcfg), ladd, AutoencoderKL.from_config(vcfg), SDXL_SCHEDULER, {"consistency": None})

    n_unet = parameters(lambda: UNet2DConditionModel.from_config(ucfg))
    # frozen UNet bf16 + trainable copy (~half the UNet) fp32 with grads and Adam's two moments + activations
    need_memory("the LADD step", n_unet * 2 + n_unet / 2 * 16 + 30 * 2**30)
    t0 = time.perf_counter()
    with materialize(device, torch.float32):  # as `LaytonTokenizer.build` loads; TokenizerTask halves the frozen parts
        tok = build()
    print(f"ladd: random weights, SDXL UNet {count(n_unet)} + trainable copy "
          f"{count(sum(p.numel() for p in tok.ladd.trainable_parameters()))}, VAE, LPIPS-{lpips.net} "
          f"({'tiny zoo sizes' if a.smoke else 'real sizes'}), built in {time.perf_counter() - t0:.0f}s", flush=True)
    for stage in (1, 2):
        with mock.patch.object(tt, "_build_model", lambda *_: tok):
            task = tt.TokenizerTask(config, stage, Worker(0, 1, device))
        st = task.st
        opt, sched = build_optimizer(st.optim, task.params)
        model = task.module.train()
        g = torch.Generator("cpu").manual_seed(0)
        b, lat = st.batch_size, tok.vae.config.latent_channels
        features = tok.token_features(torch.randint(qcfg.codebook_size, (b, 16, 16), generator=g))
        batch = tt.Batch(features, torch.randn(b, lat, px // 8, px // 8, generator=g).to(device) if stage == 1 else None,
                         (torch.rand(b, 3, px, px, generator=g) * 2 - 1).to(device) if stage == 2 else None, 0, px, 256)

        def step(i: int, task=task, opt=opt, sched=sched) -> None:  # run_training's step body, with its parts
            with autocast(device, st.mixed_precision):
                loss = task.loss(model, batch, step_generator(0, i, 0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_and_step(opt, sched, task.params, st.optim.grad_clip)

        warm = timed(lambda: step(0), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = [timed(lambda: step(i), device) for i in range(1, a.steps + 1)]
        peak = f"peak {gib(torch.cuda.max_memory_allocated())}" if device.type == "cuda" else "peak memory: CUDA only"
        what = "eps-MSE" if stage == 1 else f"{len(task.timesteps)} consistency step(s) + VAE decode + LPIPS-{lpips.net}"
        result("ladd", f"stage {stage} ({what}), {px}x{px}, batch {b}, {st.mixed_precision} autocast, gradient checkpointing "
                       f"{st.gradient_checkpointing}: median step {statistics.median(times):.3f} s over {a.steps} "
                       f"(warm-up {warm:.1f} s), {peak}")
        del opt, sched, task
        tok.ladd.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def piece_gpt(a) -> None:
    from benchmarks.gen_sampling import CACHE, RECOMP, Bench, build_model, print_batch
    from layton.gpt import PRESETS, GPTConfig

    device, dtype = setting(a)
    cfg = (GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=512) if a.smoke
           else GPTConfig(**dict(zip(("n_layer", "n_head", "dim"), PRESETS["GPT-XL"]))))
    model = build_model(cfg, device, dtype, seed=0, head_std=cfg.initializer_range)
    args = argparse.Namespace(tokens=8 if a.smoke else 256, reps=1, recompute_tokens="0" if a.smoke else "auto",
                              full_under=30.0, caption_tokens=20, cfg_scale=7.5, top_k=1000, seed=0, device=device.type)
    name = "tiny GPT" if a.smoke else "GPT-XL"
    print(f"gpt: {name}, {count(sum(p.numel() for p in model.parameters()))} parameters, random weights", flush=True)
    bench = Bench(model, args, device)
    for b in (1, 16):
        r = bench.batch_size(b)
        print_batch(r, args)
        t = r["tps"]
        star = " (recompute extrapolated)" if r["n_rec"] < args.tokens else ""
        result("gpt", f"{name} batch {b}, CFG {args.cfg_scale} ({2 * b} rows), {args.tokens} tokens, {str(dtype)[6:]}: "
                      f"KV cache {t[CACHE]:.1f} tokens/s vs recompute {t[RECOMP]:.1f} tokens/s: "
                      f"{t[CACHE] / t[RECOMP]:.2f}x{star}")


def qwen2vl_2b_dir(tiny: Path, out: Path) -> Path:
    """A Qwen2-VL-2B-size model directory without weights: the tiny zoo's tokenizer/processor files,
    its config.json resized (token ids kept), the release's pixel budget."""
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["text_config"].update(QWEN2VL_2B_TEXT)
    cfg["vision_config"].update(QWEN2VL_2B_VISION)
    cfg.update(tie_word_embeddings=True, dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    proc = json.loads((tiny / "processor_config.json").read_text())
    for k in ("image_processor", "video_processor"):
        proc[k]["size"] = dict(QWEN2VL_PIXELS)
    (out / "processor_config.json").write_text(json.dumps(proc, indent=1))
    return out


def photo_jpegs(n: int, px: int) -> list[bytes]:
    from PIL import Image
    from skimage import data

    names = ("astronaut", "coffee", "chelsea", "rocket")
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, names[i % len(names)])()).convert("RGB").resize((px, px)).save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def piece_vllm(a) -> None:
    import torch

    # The 2B-size config, checked without vLLM: transformers builds it on the meta device.
    from transformers import AutoConfig, AutoModelForImageTextToText

    model_dir = qwen2vl_2b_dir(zoo_part(a, "qwen2vl"), Path(tempfile.mkdtemp(dir=a.zoo)) / "qwen2vl-2b")
    n = parameters(lambda: AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir)))
    print(f"vllm: Qwen2-VL-2B-size config at {model_dir}: {count(n)} parameters", flush=True)
    if importlib.util.find_spec("vllm") is None:
        raise Skip(f"vLLM not installed ({VLLM_EXTRA})")
    if not torch.cuda.is_available():
        raise Skip("vLLM needs a CUDA GPU and this process sees none")
    from pipelines.recaption import require_vllm, vllm_preprocess_row, vllm_processor_config
    from pipelines.shard_rows import ACCEPTED
    from stages.synth.config import SynthConfig

    try:
        require_vllm()  # vllm and ray.data.llm (the project's vLLM path) both import
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise Skip(f"vLLM is installed but does not import with ray.data.llm ({VLLM_EXTRA}): {e}") from None
    rc = project_config("synth_flux_dev.yaml", SynthConfig).recaption
    engine = dict(vllm_processor_config(model_dir, concurrency=1, batch_size=rc.vllm_batch_size,
                                        engine_kwargs=rc.engine_kwargs).engine_kwargs)
    free, total = torch.cuda.mem_get_info()
    need_memory("vLLM Qwen2-VL-2B", n * 2 + 8 * 2**30)
    engine.setdefault("gpu_memory_utilization", min(0.9, free / total - 0.02))
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", seed=0, **engine)
    start = time.perf_counter() - t0
    images = photo_jpegs(a.vllm_images, 1024)
    rows = [vllm_preprocess_row({"status": ACCEPTED, "image": im, "prompt": PROMPTS[i % 2]}, instruction=rc.instruction,
                                max_new_tokens=rc.max_new_tokens) for i, im in enumerate(images)]
    params = [SamplingParams(**r["sampling_params"]) for r in rows]

    def chat(k: int):
        return llm.chat([r["messages"] for r in rows[:k]], params[:k], use_tqdm=False, chat_template_content_format="openai")

    warm = timed(lambda: chat(2), torch.device("cuda"))
    out = []
    dt = timed(lambda: out.extend(chat(len(rows))), torch.device("cuda"))
    tokens = sum(len(o.outputs[0].token_ids) for o in out)
    result("vllm", f"Qwen2-VL-2B size (dummy weights), {len(rows)} JPEGs 1024x1024, max_new_tokens {rc.max_new_tokens}, "
                   f"greedy, bf16: {len(rows) / dt:.2f} images/s, {tokens / dt:.0f} generated tokens/s "
                   f"({tokens / len(rows):.0f} per image); engine start {start:.0f}s, warm-up {warm:.1f}s")


RUNNERS = {"flux": piece_flux, "ladd": piece_ladd, "gpt": piece_gpt, "vllm": piece_vllm}


# --- running -----------------------------------------------------------------------------------------


def run_pieces(a) -> int:
    """The child: each named piece under its own alarm; a line per outcome."""
    import torch

    torch.manual_seed(0)
    if a.smoke:  # one thread: on a shared 2-core machine two threads wait on each other's descheduled peer
        torch.set_num_threads(1)

    def alarm(*_):
        raise PieceTimeout

    signal.signal(signal.SIGALRM, alarm)
    failed = False
    for name in a.piece.split(","):
        caps = SMOKE_CAPS if a.smoke else CAPS
        signal.alarm(caps[name])
        t0 = time.perf_counter()
        try:
            RUNNERS[name](a)
        except Skip as e:
            print(f"SKIP {name}: skipped: {e}", flush=True)
        except PieceTimeout:
            failed = True
            print(f"FAIL {name}: over its {caps[name]} s budget", flush=True)
        except Exception as e:  # noqa: BLE001 - reported, and the next piece runs
            failed = True
            import traceback

            traceback.print_exc()
            print(f"FAIL {name}: {type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)
        finally:
            signal.alarm(0)
        print(f"({name}: {time.perf_counter() - t0:.0f}s)", flush=True)
    return 1 if failed else 0


def run_group(group: list[str], a, budget: float) -> dict[str, str]:
    """One child process for `group`, killed with its whole process group (vLLM's engine too) at `budget`."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--piece", ",".join(group), "--zoo", str(a.zoo),
           "--images", str(a.images), "--steps", str(a.steps), "--vllm-images", str(a.vllm_images)] + (["--smoke"] * a.smoke)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(max(budget, 1), kill)
    timer.start()
    seen: dict[str, str] = {}
    for line in proc.stdout:
        print(line, end="", flush=True)
        m = LINE.match(line)
        if m and seen.get(m[2]) != "FAIL":
            seen[m[2]] = m[1]
    proc.wait()
    timed_out = not timer.is_alive()
    timer.cancel()
    kill()  # anything the child left behind in its group
    for name in group:
        if name not in seen:
            why = f"killed at the run's time limit ({budget:.0f} s left for it)" if timed_out else f"exited {proc.returncode} without a figure"
            print(f"FAIL {name}: {why}", flush=True)
            seen[name] = "FAIL"
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="every piece on CPU at tiny sizes (float32, 64 px, 2 steps)")
    ap.add_argument("--only", nargs="+", choices=PIECES, help="run these pieces only")
    ap.add_argument("--zoo", type=Path, help="a directory for the tiny-zoo parts (tokenizers, configs); default: a temp dir")
    ap.add_argument("--images", type=int, default=2, help="flux: timed images per variant (after one warm-up)")
    ap.add_argument("--steps", type=int, default=3, help="ladd: timed steps per stage (after one warm-up)")
    ap.add_argument("--vllm-images", type=int, default=32, help="vllm: images per timed batch")
    ap.add_argument("--piece", help=argparse.SUPPRESS)  # the child's pieces
    a = ap.parse_args()
    if min(a.images, a.steps, a.vllm_images) < 1:
        ap.error("--images, --steps and --vllm-images must be >= 1")
    if a.smoke:
        a.images, a.steps = min(a.images, 2), min(a.steps, 1)
    if a.piece:
        return run_pieces(a)

    t_start = time.perf_counter()
    pieces = a.only or list(PIECES)
    if a.smoke:  # the figure lines name the machine; no torch import here (seconds on a busy 2-core machine)
        print("benchmarks/gpu.py --smoke: every piece on CPU at tiny sizes", flush=True)
    else:
        import torch

        # No device query here: this process must not hold a CUDA context (memory) while the pieces run.
        print(f"benchmarks/gpu.py: torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
              f"{torch.cuda.device_count()} CUDA device(s) visible", flush=True)
    if not a.smoke and not torch.cuda.is_available():
        for p in pieces:
            print(f"SKIP {p}: skipped: no CUDA GPU visible to torch (run `bash benchmarks/gpu.sh --smoke` for the CPU check)")
        return 0
    own_zoo = a.zoo is None
    a.zoo = Path(tempfile.mkdtemp(prefix="layton-gpu-bench-")) if own_zoo else a.zoo.resolve()
    a.zoo.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (SMOKE_TOTAL if a.smoke else TOTAL)
    caps = SMOKE_CAPS if a.smoke else CAPS
    outcome: dict[str, str] = {}
    try:
        for group in ([pieces] if a.smoke else [[p] for p in pieces]):  # smoke: one process, less start-up
            outcome |= run_group(group, a, min(sum(caps[p] for p in group) + 15, deadline - time.monotonic()))
    finally:
        if own_zoo:
            shutil.rmtree(a.zoo, ignore_errors=True)
    words = {"RESULT": "ok", "SKIP": "skipped", "FAIL": "FAILED"}
    print("summary: " + ", ".join(f"{p} {words[outcome[p]]}" for p in pieces)
          + f"; {time.perf_counter() - t_start:.0f}s in all")
    return 1 if "FAIL" in outcome.values() else 0


if __name__ == "__main__":
    sys.exit(main())
