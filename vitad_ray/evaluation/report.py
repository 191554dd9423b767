"""`vitad report RUN_DIR`: one HTML page, with PNGs beside it, that people look at.

The page holds the paper's Table II/III layout (metrics at the calibrated threshold, plus AUROC,
PR AUC and pixel AUROC), ROC and PR curves, per-clip score timelines with the ground truth
shaded, and heatmap overlays on the most and least anomalous frames.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np

from .localize import upsample_maps
from .runfolder import read_run

TABLE_COLUMNS = [("threshold", "threshold"), ("precision", "precision"), ("recall", "recall"),
                 ("fpr", "FPR"), ("specificity", "specificity"), ("f1", "F1"),
                 ("balanced_accuracy", "balanced acc."), ("auroc", "AUROC"),
                 ("pr_auc", "PR AUC"), ("auroc_all", "AUROC (all clips)"),
                 ("pixel_auroc", "pixel AUROC")]
MAX_CURVES = 6
HEATMAP_FRAMES = 4


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_options(summary: dict) -> list[str]:
    """The paper's rows, then the best other options by AUROC, at most MAX_CURVES."""
    rows = summary["table"]
    paper = [r["option"] for r in rows if r["option"].startswith("paper")]
    others = sorted((r for r in rows if not r["option"].startswith("paper")),
                    key=lambda r: -np.nan_to_num(r["auroc"], nan=-1))
    return (paper + [r["option"] for r in others])[:MAX_CURVES]


def _scores(frames, summary: dict, option: str) -> np.ndarray:
    return frames[f"score_{summary['options'].index(option)}"].to_numpy()


def plot_curves(frames, summary: dict, evaluated: np.ndarray, out: Path) -> list[str]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _plt()
    y = frames["label"].to_numpy()[evaluated]
    names = []
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(6.4, 5.2))
        for option in curve_options(summary):
            s = np.nan_to_num(_scores(frames, summary, option)[evaluated], posinf=1e300)
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y, s)
                ax.plot(fpr, tpr, label=option, lw=1.4)
            else:
                precision, recall, _ = precision_recall_curve(y, s)
                ax.plot(recall, precision, label=option, lw=1.4)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ls=":", c="grey")
            ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        else:
            ax.axhline(y.mean(), ls=":", c="grey")
            ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
        ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "lower left")
        fig.tight_layout()
        name = f"{kind}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def plot_timelines(frames, summary: dict, option: str, threshold: float, out: Path) -> str:
    plt = _plt()
    clips = sorted(frames["clip"].unique())
    cols = 3
    rows = int(np.ceil(len(clips) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.0 * rows), squeeze=False)
    scores = _scores(frames, summary, option)
    for ax, clip in zip(axes.flat, clips):
        sel = (frames["clip"] == clip).to_numpy()
        order = np.argsort(frames["frame_index"].to_numpy()[sel])
        t = frames["frame_index"].to_numpy()[sel][order]
        label = frames["label"].to_numpy()[sel][order]
        ax.fill_between(t, 0, 1, where=label > 0, step="mid", color="tab:red", alpha=0.2,
                        transform=ax.get_xaxis_transform(), label="ground truth anomalous")
        ax.plot(t, scores[sel][order], lw=1.0, c="tab:blue", label="score")
        ax.axhline(threshold, ls="--", lw=0.8, c="k", label="threshold")
        ax.set_title(f"clip {clip}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(clips):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="upper left")
    fig.suptitle(option, fontsize=9)
    fig.tight_layout()
    name = "timelines.png"
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def heatmap_overlay(rgb: np.ndarray, patch: np.ndarray, title: str, path: Path,
                    lo: float | None = None, hi: float | None = None,
                    mask: np.ndarray | None = None) -> None:
    """A frame with its patch scores [P] (or [g, g]) over it, and the ground truth's outline."""
    plt = _plt()
    heat = upsample_maps(np.asarray(patch, np.float64).reshape(1, -1), rgb.shape[:2])[0]
    if lo is None or hi is None:
        lo, hi = float(heat.min()), float(heat.max())
    fig, ax = plt.subplots(figsize=(4.0, 4.0 * rgb.shape[0] / rgb.shape[1] + 0.4))
    ax.imshow(rgb)
    ax.imshow(heat, cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
    if mask is not None:
        ax.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heatmaps(frames, summary: dict, maps, option: str, out: Path) -> list[tuple[str, str]]:
    """Overlays on the HEATMAP_FRAMES most and least anomalous frames (by the option's score)."""
    from PIL import Image

    patch = maps[summary["patch_map_options"].index(option)]
    scores = _scores(frames, summary, option)
    order = np.argsort(-scores, kind="stable")
    picks = [("most", i) for i in order[:HEATMAP_FRAMES]] + \
            [("least", i) for i in order[::-1][:HEATMAP_FRAMES]]
    lo, hi = np.percentile(patch, [1, 99.5])
    images = []
    for rank, (kind, i) in enumerate(picks):
        row = frames.iloc[int(i)]
        path = row.get("image_path", "")
        if not path or not os.path.exists(path):
            continue
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        mask = None
        mask_path = row.get("mask_path", "")
        if mask_path and os.path.exists(mask_path):
            with Image.open(mask_path) as m:
                mask = np.asarray(m.convert("L")) > 127
        gt = "anomalous" if row["label"] > 0 else "normal"
        name = f"heatmap_{kind}_{rank % HEATMAP_FRAMES + 1}.png"
        heatmap_overlay(rgb, patch[int(i)], f"clip {row['clip']} frame {row['frame_index']} "
                        f"({gt}), score {scores[int(i)]:.2f}", out / name, lo, hi, mask)
        images.append((kind, name))
    return images


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.3f}"
    return html.escape(str(value))


def highlighted(summary: dict) -> str:
    """The option the report stands behind: the one chosen on the calibration clips; runs from
    before that choice was recorded have only the best on the evaluated clips."""
    return summary.get("chosen") or summary["best"]


def picked_text(summary: dict) -> str:
    best = f"<b>{html.escape(summary['best'])}</b>"
    if not summary.get("chosen"):
        return f"Best option on the evaluated clips (highlighted; picked in hindsight): {best}."
    return (f"Chosen on the calibration clips alone (highlighted): "
            f"<b>{html.escape(summary['chosen'])}</b>. Best on the evaluated clips, picked in "
            f"hindsight: {best}.")


def metrics_table(summary: dict) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in TABLE_COLUMNS)
    body = []
    for r in summary["table"]:
        cls = ' class="best"' if r["option"] == highlighted(summary) else ""
        cells = "".join(f"<td>{_cell(r.get(k, float('nan')))}</td>" for k, _ in TABLE_COLUMNS)
        body.append(f"<tr{cls}><th scope=row>{html.escape(r['option'])}</th>{cells}</tr>")
    return (f'<table id="metrics"><thead><tr><th>configuration</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def small_table(rows: list[dict], table_id: str) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r[c])}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}th,td{border:1px solid #ccc;
padding:3px 6px;text-align:right}tbody th{text-align:left;font-weight:normal}
tr.best{background:#e7f5e7;font-weight:bold}img{max-width:100%;border:1px solid #ddd}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;width:320px}
figcaption{font-size:11px;color:#555}"""


def run_folders(path: str | os.PathLike) -> list[Path]:
    """The run folders under ``path``: itself, or one per backbone of a `vitad evaluate` run."""
    from .runfolder import FRAMES_FILE, SUMMARY_FILE

    path = Path(path)
    if (path / SUMMARY_FILE).exists() and (path / FRAMES_FILE).exists():
        return [path]
    found = sorted(p.parent for p in path.glob(f"report/*/{FRAMES_FILE}"))
    if not found:
        raise FileNotFoundError(f"{path} is neither a run folder nor a `vitad evaluate` output "
                                "folder (no summary.json and frames.parquet)")
    return found


def build_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Render RUN_DIR (written by `vitad evaluate` or a benchmark) to OUT_DIR/index.html
    (default RUN_DIR/report)."""
    run_dir = Path(run_dir)
    frames, summary, maps = read_run(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    evaluated = frames["clip"].isin(summary["evaluated_clips"]).to_numpy()
    option = highlighted(summary)
    row = next(r for r in summary["table"] if r["option"] == option)
    curves = plot_curves(frames, summary, evaluated, out)
    timeline = plot_timelines(frames, summary, option, row["threshold"], out)
    map_option = None
    if maps is not None and summary.get("patch_map_options"):
        with_maps = [r for r in summary["table"] if r["option"] in summary["patch_map_options"]]
        map_option = option if option in summary["patch_map_options"] else max(
            with_maps, key=lambda r: np.nan_to_num(r["auroc"], nan=-1))["option"]
    heatmaps = plot_heatmaps(frames, summary, maps, map_option, out) if map_option else []
    figures = "".join(f'<figure><img src="{n}" alt="{k} anomalous frame heatmap">'
                      f"<figcaption>{k} anomalous</figcaption></figure>" for k, n in heatmaps)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>vitad_ray quality report</title><style>{CSS}</style></head><body>
<h1>Detection quality</h1>
<p>Thresholds calibrated on held-out test clips {html.escape(', '.join(summary['calibration_clips']))};
metrics on the evaluated clips {html.escape(', '.join(summary['evaluated_clips']))}.
{picked_text(summary)}</p>
<h2>Frame-level results (Table II/III layout)</h2>
{metrics_table(summary)}
<h2>Feature sets</h2>{small_table(summary.get('features', []), 'features')}
<h2>Coreset</h2>{small_table(summary.get('coreset', []), 'coreset')}
<h2>ROC and precision-recall (evaluated clips)</h2>
<div class="grid">{''.join(f'<figure><img src="{n}" alt="{n[:-4]} curves"></figure>' for n in curves)}</div>
<h2>Scores over time, ground truth shaded</h2>
<img src="{timeline}" alt="per-clip score timelines">
<h2 id="heatmaps">Where: patch heatmaps ({html.escape(map_option or 'none')})</h2>
<div class="grid">{figures}</div>
<p><small>Command: <code>{html.escape(summary.get('command', ''))}</code></small></p>
</body></html>"""
    (out / "index.html").write_text(page)
    return out / "index.html"
