"""`layton eval recon CONFIG`: reconstruction metrics (rFID, PSNR, SSIM, LPIPS) as a Ray Data job.

For every configured model (a Layton tokenizer, or a baseline: the SDXL VAE, the LlamaGen VQ), the
image set is read as a Ray Dataset, an actor pool reconstructs and scores it at `size`², and the
driver folds the per-batch results into one `ReconMetricState` in constant memory (exact sums for
PSNR/SSIM/LPIPS, float64 feature moments for rFID), so 1 and N actors give the same numbers.

Reconstruction rules: every image is resized (short side) and centre-cropped to `size`² first; the
Layton tokenizer encodes at its encoder size (256 px -> 16x16 tokens) and decodes at `size` with a
per-image seed; the SDXL VAE round-trips at `size` (posterior mean); the LlamaGen VQ reconstructs at
its encoder size and is upsampled (bicubic) to `size` — the VQ's own decoder cannot do better.
Outputs: `<output>/results.json`, `<output>/results.md` (the paper's table) and a grid per model;
`data.path`, a Layton model's `path` and `output` may be URIs (read and written through their
filesystem).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from layton.devices import pick_device
from layton.fid import FeatureStats
from layton.fid import load_fid_inception
from layton.model_files import check_file, check_model_dir
from layton.perceptual import build_lpips
from layton.ray_cluster import ray_session
from layton.recon_metrics import ReconMetricState
from layton.recon_metrics import to_uint8_rgb
from layton.seeds import derive_seed
from layton.storage import Root
from layton.tables import Table, cell
from layton.tokenizer import LaytonTokenizer
from layton.tokenizer import images_to_tensor, vae_decode, vae_encode
from layton.tokenizer import read_tokenizer_index
from layton.vq import load_llamagen_vq
from pipelines.eval_data import check_image_set
from pipelines.eval_data import read_image_set
from pipelines.eval_data import write_results
from pipelines.tokenizer_data import decode_image
from stages.eval_recon.config import ReconEvalConfig
from stages.eval_recon.config import ReconMetricsConfig, ReconModelConfig

GRID_IMAGES = 4


def _seed(key: str) -> int:
    return derive_seed("recon", key)


class ReconStage:
    """Ray Data actor: reconstruct a batch with one model and score it (per-batch metric state)."""

    def __init__(self, model: dict, metrics: dict, size: int, device: str = "auto"):
        self.m, self.size = ReconModelConfig.model_validate(model), size
        metrics = ReconMetricsConfig.model_validate(metrics)
        self.device = pick_device(device)
        self.inception = load_fid_inception(metrics.inception, self.device)
        self.lpips = build_lpips(metrics.lpips.net, metrics.lpips.backbone).to(self.device)
        self.model = _load_reconstructor(self.m, self.device)
        self.grid_sent = False  # the driver shows one grid: each actor ships its first, not one per batch

    @torch.no_grad()
    def reconstruct(self, images, keys) -> torch.Tensor:
        """PIL images -> (B, 3, size, size) reconstructions in [-1, 1]."""
        kind, size = self.m.kind, self.size
        if kind == "layton":
            out = [self.model.decode_tensor(self.model.encode([im], encoder_size=self.m.encoder_size), size=size,
                                            steps=self.m.decode_steps, seed=_seed(k)) for im, k in zip(images, keys)]
            return torch.cat(out).float()
        if kind == "sdxl_vae":
            x = images_to_tensor(images, size).to(self.device, self.model.dtype)
            return vae_decode(self.model, vae_encode(self.model, x)).float().clamp(-1, 1)
        x = images_to_tensor(images, self.m.encoder_size).to(self.device)
        recon = self.model.decode_codes(self.model.encode_codes(x)).float()
        return torch.nn.functional.interpolate(recon, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        state = ReconMetricState()
        keys, images = [], []
        for key, data in zip(batch["key"], batch["image"]):
            img, err = decode_image(data)
            if img is None:
                state.skip(err)
            else:
                keys.append(str(key))
                images.append(img)
        n = len(images)
        real_feats = recon_feats = np.zeros((0, 2048), np.float32)
        grid = np.array([b""] * 1, dtype=object)
        if images:
            real = np.stack([to_uint8_rgb(im, self.size) for im in images])
            x_recon = self.reconstruct(images, keys)
            recon = ((x_recon + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            x_real = torch.from_numpy(real).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)
            lp = self.lpips(x_real, x_recon.to(self.device)).flatten().cpu()
            real_feats, recon_feats = self.inception.features(real), self.inception.features(recon)
            state.update(real, recon, lp)
            if not self.grid_sent:
                grid = np.array([np.concatenate([real[:GRID_IMAGES], recon[:GRID_IMAGES]]).tobytes()], dtype=object)
                self.grid_sent = True
        return {"state": np.array([json.dumps(state.to_dict())], dtype=object),
                "keys": np.array([json.dumps(keys)], dtype=object),
                "real_feats": np.array([real_feats.astype(np.float32).tobytes()], dtype=object),
                "recon_feats": np.array([recon_feats.astype(np.float32).tobytes()], dtype=object),
                "grid": grid, "n": np.array([n])}


def _load_reconstructor(m, device):
    if m.kind == "layton":
        return LaytonTokenizer.from_pretrained(m.path, accel=m.accel).to(device)
    if m.kind == "sdxl_vae":
        from diffusers import AutoencoderKL

        from layton.acceleration import accelerate_vae

        sub = "vae" if (Path(m.path) / "vae" / "config.json").is_file() else None
        return accelerate_vae(AutoencoderKL.from_pretrained(m.path, subfolder=sub).to(device).eval(), m.accel)
    return load_llamagen_vq(m.path).to(device)


def check_recon_models(config: ReconEvalConfig, linked: bool = True) -> None:
    """The metric models and the models to evaluate; `linked=False` leaves out the Layton
    tokenizers (another stage of a workflow may write them)."""
    check_file(config.metrics.inception, "metrics.inception")
    check_file(config.metrics.lpips.backbone, "metrics.lpips.backbone")
    for i, m in enumerate(config.models):
        where = f"models[{i}].path ({m.name})"
        if m.kind == "layton":
            if linked:
                read_tokenizer_index(m.path, where)
        elif m.kind == "sdxl_vae":
            check_model_dir(Path(m.path) / "vae" if (Path(m.path) / "vae").is_dir() else m.path, where)
        else:
            check_file(m.path, where)


def check_recon_inputs(config: ReconEvalConfig) -> None:
    """Every path the job reads, checked before Ray starts; errors name the field."""
    check_image_set(config.data)
    check_recon_models(config)


def result_table(results: dict[str, dict], size: int) -> Table:
    return Table(["Method", "rFID ↓", "PSNR ↑", "SSIM ↑", "LPIPS ↓", "images"],
                 [[name, cell(r["rfid"], 2), cell(r["psnr"], 2), cell(r["ssim"], 4), cell(r["lpips"], 4), str(r["n"])]
                  for name, r in results.items()], title=f"Reconstruction at {size}x{size}")


def evaluate_model(config: ReconEvalConfig, model, out: Root) -> dict:
    import ray

    r = config.resources
    ds = read_image_set(config.data).map_batches(
        ReconStage, fn_constructor_kwargs=dict(model=model.model_dump(mode="json"),
                                               metrics=config.metrics.model_dump(mode="json"), size=config.size,
                                               device="cuda" if r.num_gpus else "cpu"),
        batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=r.num_actors), num_gpus=r.num_gpus,
        num_cpus=r.num_cpus, batch_format="numpy")
    total = ReconMetricState(real=FeatureStats.empty(), recon=FeatureStats.empty())
    grid = None
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for state, rf, cf, g, n in zip(batch["state"], batch["real_feats"], batch["recon_feats"], batch["grid"], batch["n"]):
            total = total.merge(ReconMetricState.from_dict(json.loads(state)))
            total.real.update(np.frombuffer(rf, np.float32).reshape(int(n), -1))
            total.recon.update(np.frombuffer(cf, np.float32).reshape(int(n), -1))
            if grid is None and g:
                grid = np.frombuffer(g, np.uint8).reshape(-1, config.size, config.size, 3)
    if grid is not None:
        from PIL import Image

        k = len(grid) // 2  # top row: originals; bottom row: reconstructions
        rows = [np.concatenate(list(grid[:k]), axis=1), np.concatenate(list(grid[k:]), axis=1)]
        buf = io.BytesIO()
        Image.fromarray(np.concatenate(rows, axis=0)).save(buf, format="PNG")
        out.write(f"grid_{_slug(model.name)}.png", buf.getvalue())
    return total.result()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def run_recon_eval(config: ReconEvalConfig) -> dict:
    t0 = time.time()
    check_recon_inputs(config)
    out = Root(config.output)  # a local path or a URI: grids and results are written there directly
    with ray_session(config.ray):
        results = {m.name: evaluate_model(config, m, out) for m in config.models}
    body = {"task": "reconstruction", "size": config.size, "data": config.data.path, "results": results,
            "config": config.model_dump(mode="json"), "seconds": time.time() - t0}
    write_results(config.output, [{"model": name, **r} for name, r in results.items()], body, result_table(results, config.size))
    return body
