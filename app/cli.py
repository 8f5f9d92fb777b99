"""The `layton` command.

Each command imports what it runs inside its function, so that
`layton --help` and `layton workflow validate` load neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from pathlib import Path

from app.cli_cluster import add_cluster_commands
from layton.config import ConfigError, load_config
from stages.registry import STAGES


def _models_tiny(args) -> None:
    from layton.zoo import write_tiny_zoo, zoo_complete

    if args.if_missing and zoo_complete(args.dir):
        print(f"{args.dir}: complete tiny zoo present")
        return
    for name, path in write_tiny_zoo(args.dir, seed=args.seed).items():
        print(f"{name:24s} {path}")


def _run_stages(args) -> None:
    """A stage command (`layton synth CONFIG`, `layton train tokenizer CONFIG --stage 2`, ...): the
    config of its stage(s), `check()` before Ray, then `execute()` (skipped when complete)."""
    stages = [cls(on_event=lambda line: print(line, flush=True), **({"force": args.force} if "force" in args else {}))
              for cls in args.stages if getattr(args, "stage", "all") in ("all", cls.name[-1])]
    from layton.ray_cluster import check_shared_storage, ray_session

    config = load_config(args.config, stages[0].config)
    for stage in stages[:1]:  # a later stage's inputs may be the earlier one's outputs: checked when it runs
        stage.check(config)
    with contextlib.ExitStack() as session:
        connected = False
        for stage in stages:
            if not connected and stage.is_complete(config) is None:  # Ray only once there is work
                session.enter_context(ray_session(config.ray))
                check_shared_storage(stage.outputs(config))
                connected = True
            for line in stage.execute(config).lines:
                print(line, flush=True)


GROUP_HELP = {"train": "training jobs on Ray Train", "eval": "evaluation jobs on Ray Data"}


def _add_stage_commands(sub) -> None:
    """One command per distinct `Stage.command` of the registry; stages sharing one get --stage."""
    groups: dict[str, object] = {}
    by_command: dict[tuple, list] = {}
    for cls in STAGES:
        by_command.setdefault(cls.command, []).append(cls)
    for command, classes in by_command.items():
        parent = sub
        for word in command[:-1]:
            if word not in groups:
                groups[word] = sub.add_parser(word, help=GROUP_HELP[word]).add_subparsers(dest="what", required=True)
            parent = groups[word]
        p = parent.add_parser(command[-1], help=classes[0].help)
        p.add_argument("config")
        if len(classes) > 1:
            p.add_argument("--stage", choices=[c.name[-1] for c in classes] + ["all"], default="all")
        if command == ("synth",):
            p.add_argument("--force", action="store_true", help="resume into an output written with other settings")
        p.set_defaults(fn=_run_stages, stages=classes)


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


def _report(args) -> None:
    from app.report import write_report

    print(write_report(args.run_dir, args.output))


def _convert_tokenizer(args) -> None:
    from layton.tokenizer import convert_legacy_tokenizer

    print(convert_legacy_tokenizer(args.src, args.dst))


def _convert_laytongen(args) -> None:
    from layton.laytongen import convert_legacy_laytongen

    print(convert_legacy_laytongen(args.src, args.dst, tokenizer=args.tokenizer))


WORKFLOW_ENV, WORKFLOW_CWD_ENV = "LAYTON_WORKFLOW", "LAYTON_WORKFLOW_CWD"


def _read_workflow(args):
    """The workflow of `args.file`, or (as a submitted Ray Job) the text in $LAYTON_WORKFLOW, whose
    relative paths resolve against the submitter's directory when this machine has it."""
    import os

    from app.workflow import load_workflow, parse_workflow

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
    from app.workflow import check_links

    wf = _read_workflow(args)
    check_links(wf)
    print(f"{wf.source}: workflow {wf.name!r} is valid; stages: {', '.join(wf.stage_names())}; root {wf.root}")


def _workflow_run(args) -> None:
    from app.runner import run_workflow

    wf = _read_workflow(args)
    print(f"workflow {wf.name}: {', '.join(wf.stage_names())} -> {wf.root}", flush=True)
    final = run_workflow(wf, on_event=lambda line: print(line, flush=True))
    print(f"workflow {wf.name}: all {len(final['stages'])} stage(s) complete; report {final['report']}")


def _workflow_submit(args) -> None:
    import os

    from app.cli_cluster import resolve_address
    from app.jobs import submit_workflow
    from app.workflow import check_links

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

    from layton.config import Acceleration

    settings = GenerateSettings(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                size=args.size, decode_steps=args.steps, seed=args.seed, dtype=args.dtype)
    accel = Acceleration(compile=args.compile, attention=args.attention)
    if args.prompts:
        if args.prompt is not None:
            raise ValueError("give a prompt or --prompts FILE, not both")

        def progress(r: dict) -> None:
            print(f"{r['id']}: {r['file'] or 'FAILED ' + r['error']}", flush=True)

        c = generate_from_file(args.laytongen, args.prompts, args.output, settings, column=args.column,
                               num_actors=args.num_actors, num_gpus=args.num_gpus, batch_size=args.batch_size, on_record=progress,
                               accel=accel)
        print(f"generate: {c['generated']} generated, {c['failed']} failed, {c['already_done']} already done "
              f"of {c['prompts']} prompt(s) in {c['seconds']:.1f}s -> {args.output}/metadata.jsonl")
        return
    if args.prompt is None:
        raise ValueError("give a prompt (\"\" samples unconditionally) or --prompts FILE")
    from layton.devices import pick_device, pick_dtype
    from layton.laytongen import LaytonGenPipeline

    device = pick_device("auto")
    pipe = LaytonGenPipeline.from_pretrained(args.laytongen, device=device, dtype=pick_dtype(args.dtype, device), accel=accel)
    params = pipe.default_params(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    (r,) = pipe(args.prompt, seed=args.seed, params=params, size=args.size, steps=args.steps)
    from layton.storage import Root, basename, parent

    png = io.BytesIO()
    r.image.save(png, format="PNG")
    Root(parent(args.output)).write(basename(args.output), png.getvalue())  # a local path or a URI
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

    shards = sub.add_parser("shards", help="shard utilities").add_subparsers(dest="what", required=True)
    stats = shards.add_parser("stats", help="summarise the complete shards of an output directory")
    stats.add_argument("dir")
    stats.add_argument("--plot", help="histogram PNG path (default DIR/score_histograms.png)")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(fn=_shards_stats)

    convert = sub.add_parser("convert", help="convert upstream checkpoints and old model directories").add_subparsers(dest="what", required=True)
    mps = convert.add_parser("mps", help="MPS .pth (pickled module) → safetensors, without running pickled code")
    mps.add_argument("src")
    mps.add_argument("dst")
    mps.set_defaults(fn=_convert_mps)
    ct = convert.add_parser("tokenizer", help="a tokenizer directory of the old layout (tokenizer_config.json) → model_index.json")
    ct.add_argument("src")
    ct.add_argument("dst")
    ct.set_defaults(fn=_convert_tokenizer)
    cg = convert.add_parser("laytongen", help="a LaytonGen directory of the old layout (laytongen.json) → model_index.json")
    cg.add_argument("src")
    cg.add_argument("dst")
    cg.add_argument("--tokenizer", help="where the tokenizer it names is now, if it moved")
    cg.set_defaults(fn=_convert_laytongen)

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
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="GPT and decoder weights on a GPU (CPU runs float32)")
    gen.add_argument("--compile", action="store_true", help="torch.compile the GPT and the decoder's UNet")
    gen.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    gen.set_defaults(fn=_generate)

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
    _add_stage_commands(sub)
    rep = sub.add_parser("report", help="a self-contained HTML report of a workflow run directory")
    rep.add_argument("run_dir")
    rep.add_argument("-o", "--output", help="HTML path (default RUN_DIR/report.html)")
    rep.set_defaults(fn=_report)
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
    except (ConfigError, FileNotFoundError, ValueError, ImportError, ConnectionError) as e:
        print(f"layton: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as e:  # e.g. ResumeConflict, WorkflowAlreadyRunning
        print(f"layton: error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
