"""The `layton` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from layton.config import ConfigError, load_config
from layton.model_files import ModelFileError


def _models_tiny(args) -> None:
    from layton.zoo import write_tiny_zoo

    for name, path in write_tiny_zoo(args.dir, seed=args.seed).items():
        print(f"{name:24s} {path}")


def _synth(args) -> None:
    from pipelines.synth import run_synth

    config = load_config(args.config)

    def progress(stats: dict) -> None:
        print(f"shard {stats['shard']:05d}: {stats['accepted']}/{stats['total']} accepted", flush=True)

    result = run_synth(config, force=args.force, on_shard=progress)
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
    plot = Path(args.plot) if args.plot else Path(args.dir) / "score_histograms.png"
    print(f"histograms: {plot_histograms(summary, plot)}")


def _convert_mps(args) -> None:
    from layton.scorers.restricted_unpickle import convert_mps_checkpoint

    print(convert_mps_checkpoint(args.src, args.dst))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layton", description="Layton on Ray: data synthesis, training, evaluation")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="model utilities").add_subparsers(dest="what", required=True)
    tiny = models.add_parser("tiny", help="write the tiny model zoo (real architectures, release formats)")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except (ConfigError, ModelFileError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"layton: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. ResumeConflict
        print(f"layton: error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
