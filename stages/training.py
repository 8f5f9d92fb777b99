"""What the two Ray Train stages (tokenizer, LaytonGen) report alike."""

from __future__ import annotations

from layton.storage import Root, join, parent
from stages.base import StageResult


def training_result(name: str, r, *, label: str, precompute: tuple[str, str], detail: str, grids: tuple[str, str],
                    output: str) -> StageResult:
    """A `TrainResult` as the stage's result. `precompute`: (what the pass is called, its unit);
    `detail`: the loss line's extra part; `grids`: (folder beside the export, what a grid shows)."""
    lines = []
    if r.precompute:
        p = r.precompute
        lines.append(f"{precompute[0]}: {p['usable']} {precompute[1]}(s) usable, {p['skipped']} skipped "
                     f"{p['skipped_by_reason'] or ''}")
    if r.skipped:  # the export already reached max_steps
        return StageResult(name, False, {"step": r.step, "export": r.export}, {output: r.export},
                           lines + [f"{name}: already complete at step {r.step}: {r.export}"])
    loss = r.metrics.get("loss")
    lines.append(f"{label}: step {r.step}, loss {float('nan') if loss is None else loss:.4f}{detail}, "
                 f"{r.seconds:.1f}s -> {r.export}")
    grid_dir = join(parent(r.export), grids[0])
    found = sorted(name for name in Root(grid_dir).list() if name.endswith(".png"))
    if found:
        lines.append(f"{label}: {grids[1]} {join(grid_dir, found[-1])}")
    return StageResult(name, False, {"step": r.step, "loss": loss, "export": r.export}, {output: r.export}, lines)
