"""`layton report RUN_DIR`: one self-contained HTML page of a workflow run directory.

Reads what the workflow left behind (any part may be missing):

    workflow.yaml, workflow_state.json       name, stage status/durations/summaries/errors
    synth/ (or any DIR/*_stats.json, ≤ 2 deep)  shard statistics (pipelines/stats.py) + histograms
    train/<job>/history.jsonl                 training curves + final values
    train/<job>/{grids,samples}/step_*.png    the latest grid of each job
    eval/<kind>/results.{md,json}, *.png      evaluation tables, recon grids

Images are embedded as base64 data URIs and the CSS is inline, so the page can be mailed or attached
to a ticket as one file. RUN_DIR may be a local path or a URI (`s3://…`): it is listed once and read
through its filesystem, and report.html is written there. A corrupt input never stops the report: it is skipped with a visible note.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import io
import json
import math
import re
import tempfile
import time
from pathlib import Path, PurePosixPath

import yaml
from PIL import Image

from layton.storage import Root, absolute, basename, join, parent
from layton.tables import Table
from pipelines.stats import format_summary, plot_histograms, shard_summary

MAX_WIDTH = 1024  # px; wider images are downscaled before embedding to bound the page size
NOT_METRICS = {"step", "time", "resumed_from"}
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccc;padding:.25em .6em;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto} img{max-width:100%;border:1px solid #ddd}
.note{background:#fff4e0;border-left:4px solid #e69500;padding:.3em .6em;margin:.3em 0}
.missing{color:#888;font-style:italic} .meta{color:#666}
.complete{color:#2a7a2a} .failed{color:#b22;font-weight:bold} .running{color:#1f5fb4} .pending,.skipped{color:#888}
"""

esc = html.escape


def write_report(run_dir: str | Path, output: str | Path | None = None) -> str:
    """Render the report of `run_dir` (a local path or a URI) to `output` (default
    `<run_dir>/report.html`, local or URI); returns where it was written."""
    run_dir = str(run_dir)
    root = Root(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    src = _Source(root, root.list(recursive=True))  # one listing: every section finds its files in it
    found = _discover(src)
    if not any(found.values()):
        raise ValueError(f"{run_dir}: nothing to report (no workflow files, shards, train/ or eval/ outputs)")
    notes: list[str] = []  # filled by the sections as they meet unreadable files
    yaml_text, workflow = _read_yaml(src, found["yaml"], notes)
    state = _read_state(src, found["state"], notes)
    name = workflow.get("name") or state.get("name") or basename(absolute(run_dir))
    body = [
        _stages(state, found["state"]),
        _shards(src, found["shards"], notes),
        _training(src, found["histories"], notes),
        _grids(src, found["grids"], found["eval_images"], notes),
        _evals(src, found["evals"], notes),
    ]
    if yaml_text:
        body.append(f"<h2>Workflow</h2><details><summary>workflow.yaml</summary><pre>{esc(yaml_text)}</pre></details>")
    head = (f"<h1>{esc(str(name))}</h1><p class=meta>run directory {esc(absolute(run_dir))}<br>"
            f"report generated {esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>")
    if notes:
        head += "<h2>Skipped inputs</h2>" + "".join(f"<div class=note>{esc(n)}</div>" for n in notes)
    page = (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{esc(str(name))} — Layton run report</title>"
            f"<style>{CSS}</style></head><body>{head}{''.join(body)}</body></html>\n")
    output = str(output) if output is not None else join(run_dir, "report.html")
    Root(parent(output)).write(basename(output), page.encode("utf-8"))
    return output


class _Source:
    """The run directory's files: its listing, reads by relative name, and names for the notes."""

    def __init__(self, root: Root, files: dict[str, int]):
        self.root, self.files = root, files

    def where(self, rel: str) -> str:
        return join(self.root.location, *rel.split("/")) if rel else self.root.location

    def read(self, rel: str) -> bytes:
        data = self.root.read(rel)
        if data is None:
            raise FileNotFoundError(f"{self.where(rel)}: gone")
        return data

    def glob(self, *patterns: str) -> list[str]:
        """Files matching any `a/*/b`-style pattern, `*` within one name (as Path.glob)."""
        def match(rel: str, pat: str) -> bool:
            parts, pats = rel.split("/"), pat.split("/")
            return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pats))

        return sorted({rel for rel in self.files for pat in patterns if match(rel, pat)})


def _dirname(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def _name(rel: str) -> str:
    return rel.rsplit("/", 1)[-1]


def _discover(src: _Source) -> dict[str, list[str]]:
    """Relative names (files) and relative directories of what the sections show."""
    shard_dirs = ["synth"] if any(rel.startswith("synth/") for rel in src.files) else []
    shard_dirs += [d for d in sorted({_dirname(p) for p in src.glob("*/*_stats.json", "*/*/*_stats.json")})
                   if d not in shard_dirs]
    return {
        "yaml": src.glob("workflow.yaml"),
        "state": src.glob("workflow_state.json"),
        "shards": shard_dirs,
        "histories": src.glob("train/*/history.jsonl"),
        "grids": sorted({_dirname(_dirname(p)) for p in src.glob("train/*/grids/*.png", "train/*/samples/*.png")}),
        "evals": sorted({_dirname(p) for p in src.glob("eval/*/results.json", "eval/*/results.md")}),
        "eval_images": src.glob("eval/*/*.png"),
    }


# ---- workflow files and stages -------------------------------------------------------------------

def _read_yaml(src: _Source, paths: list[str], notes: list[str]) -> tuple[str, dict]:
    text = ""
    try:
        text = src.read(paths[0]).decode(errors="replace") if paths else ""
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as e:
        notes.append(f"{src.where(paths[0])}: not readable YAML ({e.__class__.__name__}) — workflow name not taken from it")
        return text, {}
    return text, data if isinstance(data, dict) else {}


def _read_state(src: _Source, paths: list[str], notes: list[str]) -> dict:
    if not paths:
        return {}
    try:
        state = json.loads(src.read(paths[0]))
        if not isinstance(state, dict) or not isinstance(state.get("stages", {}), dict):
            raise ValueError("not an object with a 'stages' object")
    except (OSError, ValueError) as e:
        notes.append(f"{src.where(paths[0])}: invalid workflow state ({e}) — stages not shown")
        return {"_invalid": True}
    return state


def _stages(state: dict, paths: list[str]) -> str:
    out = "<h2>Stages</h2>"
    if not paths:
        return out + "<p class=missing>no workflow_state.json</p>"
    if state.get("_invalid"):
        return out + "<p class=missing>workflow_state.json is not readable (see the note above)</p>"
    if not state.get("stages"):
        return out + "<p class=missing>workflow_state.json lists no stages</p>"
    rows = []
    for name, st in state["stages"].items():
        st = st if isinstance(st, dict) else {}
        status = str(st.get("status") or "unknown")
        seconds = st.get("seconds")
        if seconds is None and isinstance(st.get("started"), (int, float)) and isinstance(st.get("finished"), (int, float)):
            seconds = st["finished"] - st["started"]
        summary = st.get("summary")
        summary = ", ".join(f"{k}: {_short(v)}" for k, v in summary.items()) if isinstance(summary, dict) else _short(summary or "")
        error = f"<pre>{esc(_truncate(str(st['error']), 600))}</pre>" if st.get("error") else ""
        rows.append(f"<tr><td>{esc(str(name))}</td><td class='{esc(status)}'>{esc(status)}</td>"
                    f"<td class=num>{esc(_duration(seconds))}</td><td>{esc(_truncate(summary, 240))}</td><td>{error}</td></tr>")
    return out + "<table><tr><th>stage</th><th>status</th><th>duration</th><th>summary</th><th>error</th></tr>" + "".join(rows) + "</table>"


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or math.isnan(seconds):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m {s:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _truncate(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


# ---- shard statistics ----------------------------------------------------------------------------

def _shards(src: _Source, dirs: list[str], notes: list[str]) -> str:
    out = "<h2>Shard statistics</h2>"
    if not dirs:
        return out + "<p class=missing>no shard directory (synth/ or a directory of *_stats.json)</p>"
    for rel in dirs:
        d = src.where(rel)
        try:
            summary = shard_summary(d)
            with tempfile.TemporaryDirectory() as tmp:  # the helper writes a local file; embed its bytes
                png = plot_histograms(summary, Path(tmp) / "hist.png").read_bytes()
            plot = _img(png, d, notes, alt=f"score histograms of {d}")
        except Exception as e:  # a damaged index/parquet: report it, keep the rest of the page
            notes.append(f"{d}: shard statistics failed ({e.__class__.__name__}: {e})")
            continue
        out += f"<h3>{esc(_name(rel))}</h3><pre>{esc(format_summary(summary))}</pre>{plot}"
    return out


# ---- training curves -----------------------------------------------------------------------------

def _read_history(src: _Source, rel: str, notes: list[str]) -> list[dict]:
    by_step: dict[float, dict] = {}
    path = src.where(rel)
    try:
        lines = src.read(rel).decode(errors="replace").splitlines()
    except OSError as e:
        notes.append(f"{path}: not readable ({e.__class__.__name__}) — skipped")
        return []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not _is_num(row.get("step")):
            notes.append(f"{path}: line {n} is not a JSON object with a numeric step — skipped")
            continue
        by_step[row["step"]] = row  # a resumed run re-logs the steps after its checkpoint: the later record wins
    return [by_step[s] for s in sorted(by_step)]


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _training(src: _Source, histories: list[str], notes: list[str]) -> str:
    out = "<h2>Training curves</h2>"
    if not histories:
        return out + "<p class=missing>no train/*/history.jsonl</p>"
    for rel in histories:
        rows = _read_history(src, rel, notes)
        metrics = sorted({k for r in rows for k, v in r.items() if _is_num(v) and k not in NOT_METRICS},
                         key=lambda k: (k != "loss", k))  # loss first: it is the curve people look for
        job = _name(_dirname(rel))
        out += f"<h3>{esc(job)}</h3>"
        if not metrics:
            out += f"<p class=missing>{esc(src.where(rel))}: no numeric metrics</p>"
            continue
        last = rows[-1]
        finals = "".join(f"<tr><td>{esc(k)}</td><td class=num>{esc(_short(next(r[k] for r in reversed(rows) if _is_num(r.get(k)))))}</td></tr>"
                         for k in metrics)
        out += (f"<p class=meta>{len(rows)} log steps, last step {esc(_short(last['step']))}</p>"
                f"{_uri_img(_plot_curves(rows, metrics, job), f'curves of {job}')}"
                f"<table><tr><th>metric</th><th>final</th></tr>{finals}</table>")
    return out


def _plot_curves(rows: list[dict], metrics: list[str], title: str) -> bytes:
    # The object API (no pyplot): renders with Agg and leaves no global figure state behind.
    from matplotlib.figure import Figure

    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(3.7 * cols, 3.0 * nrows))  # ≤ 1000 px wide at dpi 90
    for i, k in enumerate(metrics):
        ax = fig.add_subplot(nrows, cols, i + 1)
        pts = [(r["step"], r[k]) for r in rows if _is_num(r.get(k))]
        ax.plot(*zip(*pts), color="#c44e52" if k == "loss" else "#4c72b0", lw=2.2 if k == "loss" else 1.2,
                marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(k, fontweight="bold" if k == "loss" else "normal")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


# ---- images --------------------------------------------------------------------------------------

def _step(name: str) -> int:
    m = re.search(r"(\d+)", PurePosixPath(name).stem)
    return int(m.group(1)) if m else -1


def _grids(src: _Source, job_dirs: list[str], eval_images: list[str], notes: list[str]) -> str:
    out = "<h2>Grids</h2>"
    if not job_dirs and not eval_images:
        return out + "<p class=missing>no train/*/grids, train/*/samples or eval/*/*.png</p>"
    for job in job_dirs:
        for kind in ("grids", "samples"):
            # newest first; a corrupt newest grid falls back to the one before it
            for rel in sorted(src.glob(f"{job}/{kind}/*.png"), key=_step, reverse=True):
                if img := _img(_read_or_none(src, rel), src.where(rel), notes, alt=f"{_name(job)} {kind} {_name(rel)}"):
                    out += f"<h3>{esc(_name(job))} — {kind}/{esc(_name(rel))}</h3>{img}"
                    break
    for rel in eval_images:
        kind = _name(_dirname(rel))
        if img := _img(_read_or_none(src, rel), src.where(rel), notes, alt=f"{kind} {_name(rel)}"):
            out += f"<h3>eval/{esc(kind)} — {esc(_name(rel))}</h3>{img}"
    return out


def _read_or_none(src: _Source, rel: str) -> bytes | None:
    try:
        return src.read(rel)
    except OSError:
        return None


def _img(data: bytes | None, where: str, notes: list[str], alt: str) -> str:
    """An <img> of an image file's bytes, re-encoded as PNG and downscaled to MAX_WIDTH; '' (and a
    note naming `where`) if unreadable."""
    try:
        if data is None:
            raise FileNotFoundError(where)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.width > MAX_WIDTH:
                im = im.resize((MAX_WIDTH, max(1, round(im.height * MAX_WIDTH / im.width))), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ... for bad files
        notes.append(f"{where}: not a readable image ({e.__class__.__name__}) — skipped")
        return ""
    return _uri_img(buf.getvalue(), alt)


def _uri_img(png: bytes, alt: str) -> str:
    return f"<div><img alt='{esc(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></div>"


# ---- evaluation tables ---------------------------------------------------------------------------

def _evals(src: _Source, dirs: list[str], notes: list[str]) -> str:
    out = "<h2>Evaluation</h2>"
    if not dirs:
        return out + "<p class=missing>no eval/*/results.json or results.md</p>"
    for d in dirs:
        out += f"<h3>{esc(_name(d))}</h3>"
        rel, where = f"{d}/results.json", src.where(f"{d}/results.json")
        try:  # read once: an exception stands for what could not be read, and is reported below
            results = json.loads(src.read(rel)) if rel in src.files else FileNotFoundError(where)
        except (OSError, ValueError) as e:
            results = e
        if rel in src.files:
            try:
                seconds = _raise(results).get("seconds")
                if _is_num(seconds):
                    out += f"<p class=meta>evaluated in {esc(_duration(seconds))}</p>"
            except (OSError, ValueError, AttributeError) as e:
                notes.append(f"{where}: invalid JSON ({e.__class__.__name__}) — time not shown")
        try:
            out += Table.from_dict(_raise(results)["table"]).to_html()
        except (OSError, ValueError, KeyError, TypeError) as e:  # absent, unreadable, or written before tables were data
            notes.append(f"{where}: no readable result table ({e.__class__.__name__})")
            out += "<p class=missing>no readable result table</p>"
    return out


def _raise(value):
    if isinstance(value, Exception):
        raise value
    return value
