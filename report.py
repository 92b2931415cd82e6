"""report.md of a run: one table built from the stages' eval.json files, a bar chart per stage and the
training loss curves, as SVG text written beside it."""
import errno
import json
import sys

import files
from files import read_jsonl
from gates import floor_results, stage_results
from ranks import is_main


def svg_bars(title, bars, threshold=None, width=360, height=170):
    """A small bar chart as SVG text: (label, value, (lo, hi)) bars on a 0-1 axis with 95% interval
    whiskers."""
    left, top, bottom, slot = 40, 24, 30, (width - 50) / max(1, len(bars))
    y = lambda v: top + (1 - v) * (height - top - bottom)               # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11"><text x="{left}" y="14" font-weight="bold">'
             f'{escape(title)}</text>']
    for v in (0, 0.5, 1):
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    if threshold is not None:
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
                     f'stroke="#c00" stroke-dasharray="4 3"/>'
                     f'<text x="{width - 10}" y="{y(threshold) - 3:.1f}" '
                     f'text-anchor="end" fill="#c00">gate {threshold:g}</text>')
    for i, (label, v, (lo, hi)) in enumerate(bars):
        x = left + i * slot + slot * 0.2
        w = slot * 0.6
        parts.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{w:.1f}" height="{y(0) - y(v):.1f}" '
                     'fill="#4a7ab5"/>'
                     f'<line x1="{x + w / 2:.1f}" x2="{x + w / 2:.1f}" y1="{y(lo):.1f}" y2="{y(hi):.1f}" '
                     f'stroke="#222"/><text x="{x + w / 2:.1f}" y="{height - 16}" text-anchor="middle">'
                     f'{escape(label)}</text><text x="{x + w / 2:.1f}" y="{height - 4}" text-anchor="middle">'
                     f'{v:.2f}</text>')
    return "".join(parts) + "</svg>\n"


def svg_lines(title, curves, width=520, height=200):
    """Loss curves as SVG text: {name: [values]} on a shared y axis, each x axis stretched to the width."""
    left, top, bottom = 40, 24, 22
    vals = [v for c in curves.values() for v in c]
    lo, hi = (min(vals), max(vals)) if vals else (0, 1)
    y = lambda v: top + (hi - v) / ((hi - lo) or 1) * (height - top - bottom)   # noqa: E731
    colors = ["#4a7ab5", "#d9822b", "#3a9a5b", "#b5443a", "#7b5ea7", "#6b6b6b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11"><text x="{left}" y="14" font-weight="bold">'
             f'{escape(title)}</text>'
             f'<text x="{left - 4}" y="{y(hi) + 4:.1f}" text-anchor="end">{hi:.2f}</text>'
             f'<text x="{left - 4}" y="{y(lo) + 4:.1f}" text-anchor="end">{lo:.2f}</text>']
    for i, (name, c) in enumerate(curves.items()):
        step = (width - left - 10) / max(1, len(c) - 1)
        pts = " ".join(f"{left + j * step:.1f},{y(v):.1f}" for j, v in enumerate(c))
        color = colors[i % len(colors)]
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}"/><text x="{left + 8 + 70 * i}" '
                     f'y="{height - 6}" fill="{color}">{escape(name)}</text>')
    return "".join(parts) + "</svg>\n"


def escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fmt(r):
    """'0.412 [0.33, 0.50]' for a result with an interval."""
    return f"{r['value']:.3f} [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]" if r else "-"


def tps(ev):
    """Tokens/s of making data (tokens written), training (target tokens) and evaluating (answer tokens)."""
    t = ev.get("tokens_per_second")     # absent from eval.json files written before it was recorded
    return " / ".join(f"{t[p]:.0f}" for p in ("data", "train", "eval")) if t else "-"


def write_report(run):
    """report.md: one table built from the eval.json files, a chart per stage and the loss curves (SVG)."""
    if not is_main():
        return
    floors = floor_results(run)
    base = stage_results(run, 0) if (run.stage_dir(0) / "eval.json").exists() else {}
    lines = [f"# Bootstrapping run `{run.dir.name}`", "",
             f"Base: `{run.base}`; preset `{run.preset.name}`; seed {run.seed}. Every figure is measured on "
             "the test split of the stage's own eval set, with its 95% interval; p is the paired test "
             "against the base model on the same units (exact McNemar; a sign-flip test for the balanced "
             "stage-6 score). The floor is the best model-free responder (constants, echo, templates, "
             "copies, always refusing).", "",
             "| stage | made / kept (+replay) | metric | floor | base | after | p vs base | gate | minutes "
             "(data + train + eval) | tok/s (data / train / eval) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    curves, notes, charts, pages = {}, [], [], {}
    for k in range(1, 7):
        p = run.stage_dir(k) / "eval.json"
        if not p.exists():
            continue
        ev = json.loads(p.read_text())
        d, m = ev["data"], ev["minutes"]
        thr = f"{ev['threshold']:.2f}" if ev["threshold"] is not None else "safer than 5"
        fl = floors[k]
        lines.append(f"| {k} | {d['made']} / {d['kept']} (+{d['replay']}) | {ev['metric']} | "
                     f"{fl['value']:.3f} | "
                     f"{fmt(base.get(k))} | {fmt(ev)} | {ev['vs_base']['p']:.2g} | {thr}: "
                     f"{'**passed**' if ev['passed'] else 'failed'} | {m['data']:.1f} + {m['train']:.1f} + "
                     f"{m['eval']:.1f} | {tps(ev)} |")
        chart = f"chart-stage{k}.svg"
        bars = []
        if base:
            bars = [("floor", fl["value"], fl["interval"]), ("base", base[k]["value"], base[k]["interval"])]
        pages[chart] = svg_bars(f"stage {k}: {ev['metric']} (test)", bars + [
            (f"stage {k}", ev["value"], ev["interval"])], ev["threshold"])
        charts.append(f"![stage {k}]({chart})")
        log = run.stage_dir(k) / "train.jsonl"
        if log.exists():
            curves[f"stage {k}"] = [r["loss"] for r in read_jsonl(log)]
        notes.append(f"- stage {k}: {ev['message']}")
    lines += ["", "## Gates", ""] + notes + ["", "## Charts", ""] + charts
    if curves:
        pages["loss.svg"] = svg_lines("training loss per step", curves)
        lines += ["", "![loss curves](loss.svg)"]
    pages["report.md"] = "\n".join(lines) + "\n"
    publish_report(run.dir, pages)


def publish_report(folder, pages):
    """Write the charts, then report.md; a finished run on read-only media prints its report instead."""
    try:
        for name, text in pages.items():
            files.atomic_text(folder / name, text)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        print(f"{folder} is read-only ({e.strerror}); the report, not written:\n", file=sys.stderr,
              flush=True)
        print(pages["report.md"], flush=True)
