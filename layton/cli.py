"""The `layton` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from layton.cli_cluster import add_cluster_commands
from layton.config import ConfigError, load_config
from layton.model_files import ModelFileError
from layton.report import add_report_command


def _models_tiny(args) -> None:
    from layton.zoo import write_tiny_zoo, zoo_complete

    if args.if_missing and zoo_complete(args.dir):
        print(f"{args.dir}: complete tiny zoo present")
        return
    for name, path in write_tiny_zoo(args.dir, seed=args.seed).items():
        print(f"{name:24s} {path}")


def _synth(args) -> None:
    from pipelines.synth import run_synth

    config = load_config(args.config)
    start = time.time()

    def progress(stats: dict, so_far) -> None:
        elapsed = time.time() - start
        n, todo = so_far.shards_written, so_far.shards_planned
        eta = f", ~{elapsed / n * (todo - n):.0f}s left" if n < todo else ""
        print(f"shard {stats['shard']:05d}: {stats['accepted']}/{stats['total']} accepted, {stats['rejected']} rejected, "
              f"{stats['failed']} failed | {n}/{todo} shards, {so_far.accepted} accepted / {so_far.rejected} rejected "
              f"so far, {elapsed:.0f}s{eta}", flush=True)

    def planned(r) -> None:
        p = r.plan
        print(f"synth: plan {p['shards']} shard(s) over {p['rows']} input row(s) of {p['inputs']} file(s): "
              f"{r.shards_skipped} complete, {r.shards_planned} to do", flush=True)

    result = run_synth(config, force=args.force, on_plan=planned, on_shard=progress)
    print(
        f"synth: wrote {result.shards_written} shard(s), kept {result.shards_skipped} complete one(s); "
        f"{result.accepted} accepted / {result.rejected} rejected / {result.failed} failed in {result.seconds:.1f}s"
    )
    print(f"summary: layton shards stats {config.output.dir}")


def _shards_stats(args) -> None:
    from pipelines.stats import format_summary, plot_histograms, shard_summary

    summary = shard_summary(args.dir)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if not k.startswith("_")}, indent=1))
    else:
        print(format_summary(summary))
    from layton.storage import is_uri

    # Beside the shards when they are on a local disk; in the working directory for a URI.
    plot = Path(args.plot or ("score_histograms.png" if is_uri(args.dir) else Path(args.dir) / "score_histograms.png"))
    print(f"histograms: {plot_histograms(summary, plot)}")


def _convert_mps(args) -> None:
    from layton.scorers.restricted_unpickle import convert_mps_checkpoint

    print(convert_mps_checkpoint(args.src, args.dst))


def _train_tokenizer(args) -> None:
    from layton.config import TokenizerTrainConfig
    from workflows.train_tokenizer import run_tokenizer_stage

    config = load_config(args.config, TokenizerTrainConfig)
    for stage in ([1, 2] if args.stage == "all" else [int(args.stage)]):
        r = run_tokenizer_stage(config, stage)
        if r.precompute:
            p = r.precompute
            print(f"precompute: {p['usable']} image(s) usable, {p['skipped']} skipped {p['skipped_by_reason'] or ''}")
        if r.skipped:
            print(f"stage {stage}: already complete at step {r.step}: {r.tokenizer_dir}")
        else:
            m = r.metrics
            print(f"stage {stage}: step {r.step}, loss {m.get('loss', float('nan')):.4f}, "
                  f"{m.get('skipped_images', 0)} image(s) skipped, {r.seconds:.1f}s -> {r.tokenizer_dir}")
        grids = sorted((Path(r.tokenizer_dir).parent / "grids").glob("*.png"))
        if grids:
            print(f"stage {stage}: reconstruction grid {grids[-1]}")


def _train_gen(args) -> None:
    from layton.config import GenTrainConfig
    from workflows.train_gen import run_gen_training

    config = load_config(args.config, GenTrainConfig)
    r = run_gen_training(config)
    if r.precompute:
        p = r.precompute
        print(f"text precompute: {p['usable']} caption(s) usable, {p['skipped']} skipped {p['skipped_by_reason'] or ''}")
    if r.skipped:
        print(f"laytongen: already complete at step {r.step}: {r.directory}")
    else:
        m = r.metrics
        print(f"laytongen: step {r.step}, loss {m.get('loss', float('nan')):.4f} (uniform {m.get('uniform_ce', float('nan')):.4f}), "
              f"{m.get('skipped_rows', 0)} row(s) skipped, {r.seconds:.1f}s -> {r.directory}")
    grids = sorted((Path(r.directory).parent / "samples").glob("*.png"))
    if grids:
        print(f"laytongen: sample grid {grids[-1]}")


def _eval_recon(args) -> None:
    from layton.config import ReconEvalConfig
    from workflows.eval_recon import run_recon_eval

    body = run_recon_eval(load_config(args.config, ReconEvalConfig))
    out = Path(body["config"]["output"])
    print((out / "results.md").read_text())
    for name, r in body["results"].items():
        if r["skipped"]:
            print(f"{name}: skipped {r['skipped']}")
    print(f"results: {out / 'results.json'} ({body['seconds']:.1f}s)")


def _eval_geneval(args) -> None:
    from layton.config import GenEvalRunConfig
    from workflows.eval_geneval import run_geneval

    body = run_geneval(load_config(args.config, GenEvalRunConfig))
    out = Path(body["config"]["output"])
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'} ({body['images']} image(s), {body['seconds']:.1f}s)")


def _eval_coco(args) -> None:
    from layton.config import CocoEvalConfig
    from workflows.eval_coco import run_coco_eval

    body = run_coco_eval(load_config(args.config, CocoEvalConfig))
    out = Path(body["config"]["output"])
    print((out / "results.md").read_text())
    if body["skipped"]:
        print(f"skipped: {body['skipped']}")
    if body["without_face"]:
        print(f"{body['without_face']} image(s) without a detected face (no FaceScore)")
    print(f"results: {out / 'results.json'} ({body['images']} of {body['captions']} caption(s) scored, {body['seconds']:.1f}s)")


WORKFLOW_ENV, WORKFLOW_CWD_ENV = "LAYTON_WORKFLOW", "LAYTON_WORKFLOW_CWD"


def _read_workflow(args):
    """The workflow of `args.file`, or (as a submitted Ray Job) the text in $LAYTON_WORKFLOW, whose
    relative paths resolve against the submitter's directory when this machine has it."""
    import os

    from layton.workflow import load_workflow, parse_workflow

    if not getattr(args, "from_env", False):
        if args.file is None:
            raise ValueError("give a workflow FILE")
        return load_workflow(args.file)
    if WORKFLOW_ENV not in os.environ:
        raise ValueError(f"--from-env: ${WORKFLOW_ENV} is not set (it is set by `layton workflow submit`)")
    cwd = os.environ.get(WORKFLOW_CWD_ENV)
    if cwd and Path(cwd).is_dir():
        os.chdir(cwd)
    return parse_workflow(os.environ[WORKFLOW_ENV], os.environ.get("LAYTON_WORKFLOW_SOURCE", f"${WORKFLOW_ENV}"))


def _workflow_validate(args) -> None:
    from layton.workflow import check_links

    wf = _read_workflow(args)
    check_links(wf)
    print(f"{wf.source}: workflow {wf.name!r} is valid; stages: {', '.join(wf.stages())}; root {wf.root}")


def _workflow_run(args) -> None:
    from workflows.run_workflow import run_workflow

    wf = _read_workflow(args)
    print(f"workflow {wf.name}: {', '.join(wf.stages())} -> {wf.root}", flush=True)
    final = run_workflow(wf, on_event=lambda line: print(line, flush=True))
    print(f"workflow {wf.name}: all {len(final['stages'])} stage(s) complete; report {final['report']}")


def _workflow_submit(args) -> None:
    import os

    from layton.cli_cluster import resolve_address
    from layton.jobs import submit_workflow
    from layton.workflow import check_links

    wf = _read_workflow(args)
    check_links(wf)  # a broken workflow is refused here, not on the cluster
    address = resolve_address(args.address)
    sid = submit_workflow(address, wf.name, Path(args.file).read_text(),
                          env_vars={WORKFLOW_CWD_ENV: os.getcwd(), "LAYTON_WORKFLOW_SOURCE": str(args.file)})
    print(sid)
    print(f"follow it: layton jobs status {sid} --address {address}; layton jobs logs {sid} --follow --address {address}")


DEFAULT_TOKENIZER = "runs/demo/train/tokenizer-stage2/tokenizer"
DEFAULT_LAYTONGEN = "runs/demo/train/laytongen/laytongen"


def _generate(args) -> None:
    from pipelines.generate import GenerateSettings, generate_from_file

    settings = GenerateSettings(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                size=args.size, decode_steps=args.steps, seed=args.seed)
    if args.prompts:
        if args.prompt is not None:
            raise ValueError("give a prompt or --prompts FILE, not both")

        def progress(r: dict) -> None:
            print(f"{r['id']}: {r['file'] or 'FAILED ' + r['error']}", flush=True)

        c = generate_from_file(args.laytongen, args.prompts, args.output, settings, column=args.column,
                               num_actors=args.num_actors, num_gpus=args.num_gpus, batch_size=args.batch_size, on_record=progress)
        print(f"generate: {c['generated']} generated, {c['failed']} failed, {c['already_done']} already done "
              f"of {c['prompts']} prompt(s) in {c['seconds']:.1f}s -> {args.output}/metadata.jsonl")
        return
    if args.prompt is None:
        raise ValueError("give a prompt (\"\" samples unconditionally) or --prompts FILE")
    from layton.devices import pick_device
    from layton.laytongen import LaytonGenPipeline

    pipe = LaytonGenPipeline.from_pretrained(args.laytongen, device=pick_device("auto"))
    params = pipe.default_params(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    (r,) = pipe(args.prompt, seed=args.seed, params=params, size=args.size, steps=args.steps)
    r.image.save(args.output)
    notes = [n for n, on in (("unconditional: empty prompt", r.unconditional), ("truncated to 120 T5 tokens", r.truncated)) if on]
    print(f"{args.output}" + (f" ({'; '.join(notes)})" if notes else ""))


def _encode(args) -> None:
    import numpy as np
    from PIL import Image

    from layton.tokenizer import LaytonTokenizer

    tok = LaytonTokenizer.from_pretrained(args.tokenizer)
    images = []
    for path in args.images:
        try:
            images.append(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
    ids = tok.encode(images, encoder_size=args.encoder_size).cpu().numpy().astype(np.int32)
    np.save(args.output, ids)
    print(f"{args.output}: ids {tuple(ids.shape)} ({ids.shape[1] * ids.shape[2]} tokens per image)")


def _decode(args) -> None:
    import numpy as np

    from layton.tokenizer import LaytonTokenizer

    try:
        ids = np.load(args.ids, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{args.ids}: not a token id array ({e})") from None
    if ids.ndim == 2:
        ids = ids[None]
    tok = LaytonTokenizer.from_pretrained(args.tokenizer)
    images = tok.decode(ids, size=args.size, steps=args.steps, sampler=args.sampler, seed=args.seed)
    out = Path(args.output)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(len(images))]
    for img, path in zip(images, paths):
        img.save(path)
        print(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layton", description="Layton on Ray: data synthesis, training, evaluation")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="model utilities").add_subparsers(dest="what", required=True)
    tiny = models.add_parser("tiny", help="write the tiny model zoo (real architectures, release formats)")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--if-missing", action="store_true", help="do nothing when DIR holds a complete zoo of this version")
    tiny.set_defaults(fn=_models_tiny)

    synth = sub.add_parser("synth", help="run or resume a synthesis config")
    synth.add_argument("config")
    synth.add_argument("--force", action="store_true", help="resume into an output written with other settings")
    synth.set_defaults(fn=_synth)

    shards = sub.add_parser("shards", help="shard utilities").add_subparsers(dest="what", required=True)
    stats = shards.add_parser("stats", help="summarise the complete shards of an output directory")
    stats.add_argument("dir")
    stats.add_argument("--plot", help="histogram PNG path (default DIR/score_histograms.png)")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(fn=_shards_stats)

    convert = sub.add_parser("convert", help="convert upstream checkpoints").add_subparsers(dest="what", required=True)
    mps = convert.add_parser("mps", help="MPS .pth (pickled module) → safetensors, without running pickled code")
    mps.add_argument("src")
    mps.add_argument("dst")
    mps.set_defaults(fn=_convert_mps)

    train = sub.add_parser("train", help="training jobs on Ray Train").add_subparsers(dest="what", required=True)
    tt = train.add_parser("tokenizer", help="train the Layton tokenizer (resumes when rerun)")
    tt.add_argument("config")
    tt.add_argument("--stage", choices=["1", "2", "all"], default="all")
    tt.set_defaults(fn=_train_tokenizer)

    tg = train.add_parser("gen", help="train LaytonGen (resumes when rerun)")
    tg.add_argument("config")
    tg.set_defaults(fn=_train_gen)

    gen = sub.add_parser("generate", help="text -> image with LaytonGen (one prompt, or a prompt file as a Ray Data job)")
    gen.add_argument("prompt", nargs="?", help='the prompt; "" samples unconditionally')
    gen.add_argument("-o", "--output", required=True, help="PNG path (one prompt) or output directory (--prompts)")
    gen.add_argument("--prompts", help="prompt file: .txt (a line each), .jsonl ('prompt' field) or .parquet")
    gen.add_argument("--column", default="prompt", help="field/column of .jsonl/.parquet prompt files")
    gen.add_argument("--laytongen", default=DEFAULT_LAYTONGEN, help=f"LaytonGen directory (default {DEFAULT_LAYTONGEN})")
    gen.add_argument("--cfg-scale", type=float, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, default=1024, help="output px")
    gen.add_argument("--steps", type=int, default=None, help="decoder steps (default: the tokenizer's consistency steps)")
    gen.add_argument("--num-actors", type=int, default=1)
    gen.add_argument("--num-gpus", type=float, default=0.0, help="per actor")
    gen.add_argument("--batch-size", type=int, default=4)
    gen.set_defaults(fn=_generate)

    ev = sub.add_parser("eval", help="evaluation jobs on Ray Data").add_subparsers(dest="what", required=True)
    er = ev.add_parser("recon", help="rFID / PSNR / SSIM / LPIPS of tokenizers and baselines")
    er.add_argument("config")
    er.set_defaults(fn=_eval_recon)
    eg = ev.add_parser("geneval", help="GenEval: generate (optional) and score in GenEval's layout")
    eg.add_argument("config")
    eg.set_defaults(fn=_eval_geneval)
    ec = ev.add_parser("coco", help="COCO-5K captions: generate (optional), ImageReward / MPS / HPSv2 / FaceScore means")
    ec.add_argument("config")
    ec.set_defaults(fn=_eval_coco)

    wfp = sub.add_parser("workflow", help="a whole experiment from one workflow file").add_subparsers(dest="what", required=True)
    wr = wfp.add_parser("run", help="run (or resume) a workflow on the current Ray (a local instance if none)")
    wr.add_argument("file", nargs="?")
    wr.add_argument("--from-env", action="store_true", help=f"read the workflow from ${WORKFLOW_ENV} (submitted jobs)")
    wr.set_defaults(fn=_workflow_run)
    wv = wfp.add_parser("validate", help="check a workflow file (schema, stage links) without running anything")
    wv.add_argument("file")
    wv.set_defaults(fn=_workflow_validate)
    ws = wfp.add_parser("submit", help="submit a workflow as a Ray Job; prints the submission id")
    ws.add_argument("file")
    ws.add_argument("--address", help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (default: "
                    "$RAY_API_SERVER_ADDRESS / $RAY_ADDRESS, else the head `layton cluster up` started)")
    ws.set_defaults(fn=_workflow_submit)
    add_report_command(sub)
    add_cluster_commands(sub)

    enc = sub.add_parser("encode", help="images -> token ids (.npy, shape (N, h, w))")
    enc.add_argument("images", nargs="+")
    enc.add_argument("-o", "--output", required=True)
    enc.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help=f"tokenizer directory (default {DEFAULT_TOKENIZER})")
    enc.add_argument("--encoder-size", type=int, default=None, help="encoder input px (default: the tokenizer's, 256)")
    enc.set_defaults(fn=_encode)

    dec = sub.add_parser("decode", help="token ids (.npy) -> image(s)")
    dec.add_argument("ids")
    dec.add_argument("-o", "--output", required=True)
    dec.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help=f"tokenizer directory (default {DEFAULT_TOKENIZER})")
    dec.add_argument("--size", type=int, default=1024)
    dec.add_argument("--steps", type=int, default=None, help="consistency steps (1 or 2) or DDIM steps")
    dec.add_argument("--sampler", choices=["consistency", "ddim"], default=None)
    dec.add_argument("--seed", type=int, default=0)
    dec.set_defaults(fn=_decode)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except (ConfigError, ModelFileError, FileNotFoundError, ValueError, ImportError, ConnectionError) as e:
        print(f"layton: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as e:  # e.g. ResumeConflict, WorkflowAlreadyRunning
        print(f"layton: error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
