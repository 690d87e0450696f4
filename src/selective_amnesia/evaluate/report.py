"""Human-readable outputs of a run: sample grids, loss curves and a self-contained HTML report.

Everything is written atomically (temporary name, then rename), so an interrupted run never leaves a
half-written PNG or HTML file that looks complete.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selective_amnesia.io.artifacts import atomic_path

MISSING = "\u2014"  # em dash, shown for absent values


def image_grid(images_uint8: Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile (N, C, H, W) uint8 images into one (H', W', C) array, ``nrow`` images per row.

    ``padding`` pixels of ``pad_value`` surround every image, so dark MNIST digits stay visually apart.
    C must be 1 or 3; the channel axis is kept so callers know what they get.
    """
    x = torch.as_tensor(images_uint8)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(
            f"expected uint8 images (N >= 1, C in {{1, 3}}, H, W), got {x.dtype} {tuple(x.shape)}"
        )
    if nrow < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError("nrow must be >= 1, padding >= 0 and pad_value in [0, 255]")
    n, c, h, w = x.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    arr = x.detach().cpu().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[top : top + h, left : left + w] = arr[i]
    return grid


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write a uint8 (H, W), (H, W, 1) or (H, W, 3) array as a PNG, atomically."""
    from PIL import Image

    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"expected (H, W), (H, W, 1) or (H, W, 3), got {a.shape}")
    image = Image.fromarray(np.ascontiguousarray(a), mode="L" if a.ndim == 2 else "RGB")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def smoothed(values: np.ndarray, window: int | None = None) -> np.ndarray:
    """A centred moving average (window ~ 1/10 of the points, odd), edges averaged over what exists."""
    n = values.size
    window = window or max(1, (n // 10) | 1)
    if window <= 1 or n < 3:
        return values.astype(np.float64)
    kernel = np.ones(window)
    finite = np.isfinite(values)
    total = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    count = np.convolve(finite.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def plot_losses(history: Mapping[str, Sequence[float]], steps: Sequence[int], path: str | Path) -> None:
    """One subplot per loss term against training step: linear axes, the raw values faint and a moving
    average over them (log axes made narrow ranges look like trends).

    Uses matplotlib's object API with the Agg canvas, so no display and no global pyplot state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    terms = [k for k, v in history.items() if len(v) > 0]
    if not terms:
        raise ValueError("history has no loss values to plot")
    for k in terms:
        if len(history[k]) != len(steps):
            raise ValueError(f"history[{k!r}] has {len(history[k])} values but there are {len(steps)} steps")
    fig = Figure(figsize=(6.0, 2.4 * len(terms)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(terms), 1, sharex=True, squeeze=False)[:, 0]
    for ax, k in zip(axes, terms, strict=True):
        values = np.asarray(history[k], dtype=np.float64)
        ax.plot(list(steps), values, lw=0.8, alpha=0.35, color="C0", label="logged")
        ax.plot(list(steps), smoothed(values), lw=1.8, color="C0", label="moving average")
        ax.set_ylabel(k)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="upper right", fontsize="small", frameon=False)
    axes[-1].set_xlabel("step")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_sequence(sequence: Mapping[str, Any], path: str | Path) -> None:
    """A sequence's steps: each forgotten class's rate of being drawn as itself (from the step that
    forgot it on; a rise is rebound) and the kept classes' mean accuracy (drift), against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = list(sequence["columns"])
    xs = [int(c["step"]) for c in columns]
    fig = Figure(figsize=(6.0, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (label, at) in enumerate(dict(sequence["forgotten_at_step"]).items()):
        ys = [c["as_itself"][label] for c in columns]
        ax.plot(
            xs, ys, marker="o", color=f"C{i + 1}", label=f"{label} drawn as itself (forgotten at step {at})"
        )
        ax.axvline(int(at), color=f"C{i + 1}", lw=0.6, ls=":")
    ax.plot(
        xs,
        [c["kept_accuracy"] for c in columns],
        marker="s",
        color="C0",
        lw=2,
        label="kept classes: accuracy",
    )
    ax.set_xticks(xs)
    ax.set_xlabel("step (0 = base model)")
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", frameon=False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _sequence_section(
    sequence: Any,
    *,
    what: str = "class",
    title: str = "Sequence: every class after every step",
    note: str | None = None,
) -> list[str]:
    """The concept x step table: each class's (``what``'s) rate of being drawn as itself after every step."""
    if not isinstance(sequence, Mapping) or not sequence.get("columns"):
        return []
    columns = list(sequence["columns"])
    at = dict(sequence.get("forgotten_at_step") or {})
    head = "".join(f"<th>step {int(c['step'])}</th>" for c in columns)
    rows = []
    for label in sequence.get("classes", []):
        key = str(label)
        cells = []
        for c in columns:
            value = _fmt(c["as_itself"].get(key), 3)
            forgotten = key in at and int(at[key]) <= int(c["step"])
            cells.append(f"<td><b>{value}</b></td>" if forgotten else f"<td>{value}</td>")
        status = f"forgotten at step {at[key]}" if key in at else "kept"
        rows.append(f"<tr><td>{html.escape(key)} ({status})</td>{''.join(cells)}</tr>")
    plural = "es" if what.endswith("s") else "s"
    for name, field in (
        (f"kept {what}{plural}: mean accuracy", "kept_accuracy"),
        (f"kept {what}{plural}: FID", "kept_fid"),
        ("forgotten so far: highest rate", "forgotten_max_as_itself"),
    ):
        if all(c.get(field) is None for c in columns):
            continue  # not measured for this family
        line = "".join(f"<td>{_fmt(c.get(field), 3)}</td>" for c in columns)
        rows.append(f"<tr><td>{name}</td>{line}</tr>")
    parts = [f"<h2>{html.escape(title)}</h2>"]
    if sequence.get("anchor") is not None:
        anchor = html.escape(str(sequence.get("anchor")))
        alpha = sequence.get("online_alpha")
        replayed = sequence.get("replay_forgotten")
        how = "as their surrogate's images" if replayed == "surrogate" else "not at all (left out of replay)"
        parts.append(
            f"<p>Anchor: <b>{anchor}</b>{f' (alpha {_fmt(alpha)})' if alpha is not None else ''}. "
            f"{what.capitalize()}{plural} forgotten in earlier steps were replayed {how}.</p>"
        )
    parts.append(f"<table><tr><th>{html.escape(what)}</th>{head}</tr>{''.join(rows)}</table>")
    parts.append(
        '<p class="note">'
        + (
            note
            or "Each cell: fraction of the class's samples the evaluation classifiers call that class "
            "(argmax, mean over seeds). Bold: the class is forgotten by that step, so the value should "
            "stay near 0 (a rise is rebound); for kept classes it is their accuracy (a fall is drift)."
        )
        + "</p>"
    )
    return parts


# ---- HTML report -------------------------------------------------------------------------------------

_FORGET_ROWS = [
    ("p_forget", "P(y = c<sub>f</sub> | x)"),
    ("entropy", "classifier entropy (nats)"),
    ("frac_classified_forget", "fraction classified as c<sub>f</sub>"),
]
_REMEMBER_ROWS = [
    ("remembered_accuracy", "classifier accuracy"),
    ("fid", "FID (classifier features)"),
    ("precision", "precision"),
    ("recall", "recall"),
]
_KNOWN_KEYS = {k for k, _ in _FORGET_ROWS + _REMEMBER_ROWS} | {"classifier_seeds", "n"}
_KNOWN_KEYS |= {f"{k}_std" for k in _KNOWN_KEYS}
# how a metric was measured (counts, feature extractor, sampler, time): shown apart from the metrics
_METADATA_KEYS = {
    "sampler",
    "num_forget_samples",
    "num_remembered_samples",
    "num_real_images",
    "feature_extractor",
    "inception_feature_extractor",
    "inception_num_real",
    "inception_num_fake",
    "seconds",
}

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
figure { display: inline-block; margin: 0 1.5em 1em 0; vertical-align: top; }
figcaption { font-size: 0.9em; color: #555; }
.note { color: #555; font-size: 0.9em; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    """Format a scalar for a table cell; None and missing values become an em dash."""
    if value is None or isinstance(value, (dict, list, tuple)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return (
            f"{value:.{digits}g}"
            if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3)
            else f"{value:.{digits}f}"
        )
    return html.escape(str(value))


def _metric_cell(metrics: Any, key: str) -> str:
    if not isinstance(metrics, Mapping) or key not in metrics:
        return MISSING
    cell = _fmt(metrics[key])
    std = metrics.get(f"{key}_std")
    if isinstance(std, (int, float)) and cell != MISSING:  # spread over classifier seeds
        cell += f" &plusmn; {_fmt(std)}"
    return cell


def _metric_table(rows: Sequence[tuple[str, str]], base: Any, forget: Any) -> str:
    out = ["<table>", "<tr><th>metric</th><th>base model</th><th>after forgetting</th></tr>"]
    for key, label in rows:
        out.append(
            f"<tr><td>{label}</td><td>{_metric_cell(base, key)}</td><td>{_metric_cell(forget, key)}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _kv_table(mapping: Any, header: tuple[str, str]) -> str:
    if not isinstance(mapping, Mapping) or not mapping:
        return f"<p>{MISSING}</p>"
    out = ["<table>", f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>"]
    for k, v in mapping.items():
        out.append(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _embedded(path: Path) -> str:
    """A PNG as a data: URI; the file name (relative link) when it cannot be read."""
    import base64

    try:
        data = path.read_bytes()
    except OSError:
        return html.escape(path.name, quote=True)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _rows_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return f"<p>{MISSING}</p>"
    header = list(rows[0])
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_fmt(row.get(h))}</td>" for h in header) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _config_text(config: Any) -> str:
    if config is None:
        return MISSING
    try:
        import yaml

        return str(yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
    except Exception:  # not plain YAML data (e.g. a Path): JSON with str() fallback still shows it
        return json.dumps(config, indent=2, default=str)


def _figures(images: Mapping[str, str] | None, out_dir: Path) -> list[str]:
    """A "Figures" section; the page carries its images (mail or attach it alone)."""
    if not images:
        return []
    parts = ["<h2>Figures</h2>"]
    for caption, name in images.items():
        src = _embedded(out_dir / str(name))
        parts.append(
            f'<figure><img src="{src}" alt="{html.escape(caption, quote=True)}">'
            f"<figcaption>{html.escape(caption)} ({html.escape(str(name))})</figcaption></figure>"
        )
    return parts


def write_html_report(out_dir: Path, report: Mapping[str, Any], images: Mapping[str, str]) -> Path:
    """Write ``out_dir/report.html``, a single readable page summarising a forgetting run.

    ``images`` maps a caption to a PNG file name relative to ``out_dir``, e.g.
    ``{"before": "samples_base.png", "after": "samples_forget.png", "losses": "losses.png"}``;
    they are embedded as data: URIs, so the page is self-contained.

    ``report`` is a plain nested dict; every key is optional and missing values render as an em dash::

        {
          "title": str,
          "forget_label": int,
          "metrics": {
            "base":   {"p_forget", "entropy", "entropy_std", "frac_classified_forget",
                       "remembered_accuracy", "fid", "precision", "recall", "classifier_seeds"},
            "forget": {... same keys ...},
          },
          "timings": {name: seconds, ...},
          "config": {...},        # the resolved config, shown as YAML
          "environment": {package: version, ...},
        }

    Extra scalar keys in the metrics dicts are shown in an "other metrics" table, those saying how they
    were measured (counts, sampler, feature extractor, seconds) in a table of their own; ``classifiers``
    (the run's classifier infos) names each judge by seed and recipe hash. Returns the path.
    """
    out_dir = Path(out_dir)
    title = str(report.get("title") or "Selective Amnesia report")
    forget_label = report.get("forget_label")
    raw_metrics = report.get("metrics")
    metrics: Mapping[str, Any] = raw_metrics if isinstance(raw_metrics, Mapping) else {}
    base, forget = metrics.get("base"), metrics.get("forget")
    seeds = [m.get("classifier_seeds") for m in (base, forget) if isinstance(m, Mapping)]
    seeds_text = _fmt(next((s for s in seeds if s is not None), None))

    parts = _page_start(title) + [
        f"<p>Forgotten class c<sub>f</sub> = <b>{_fmt(forget_label)}</b>. "
        f"Classifier seeds averaged: {seeds_text}.</p>",
        f"<h2>Forgotten class (c<sub>f</sub> = {_fmt(forget_label)})</h2>",
        _metric_table(_FORGET_ROWS, base, forget),
        '<p class="note">With a uniform q(x | c<sub>f</sub>) the ideal after forgetting is P = 1/10 '
        "and entropy = ln 10 &asymp; 2.303 nats (paper, section 4). Values are means over "
        "classifier seeds &plusmn; their standard deviation.</p>",
        "<h2>Remembered classes</h2>",
        _metric_table(_REMEMBER_ROWS, base, forget),
        '<p class="note">FID and precision/recall compare generated samples of the remembered classes with '
        "real test images, in the evaluation classifier's penultimate-feature space (not Inception).</p>",
    ]
    parts += _sequence_section(report.get("sequence"))
    parts += _extra_metric_sections(base, forget)
    parts += _classifiers_section(report.get("classifiers"))
    parts += _figures(images, out_dir)
    parts += _closing_sections(report)
    path = out_dir / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def _extra_metric_sections(base: Any, forget: Any) -> list[str]:
    """The metrics' scalar keys beyond the known rows: "Other metrics", and "How the metrics were measured"
    for those that describe the measurement."""
    parts = []
    extra_keys = [
        k
        for m in (base, forget)
        if isinstance(m, Mapping)
        for k, v in m.items()
        if k not in _KNOWN_KEYS and not isinstance(v, (dict, list, tuple))
    ]
    extra_keys = list(dict.fromkeys(extra_keys))
    metric_keys = [k for k in extra_keys if k not in _METADATA_KEYS and not k.endswith("_std")]
    meta_keys = [k for k in extra_keys if k in _METADATA_KEYS]
    if metric_keys:
        parts.append("<h3>Other metrics</h3>")
        parts.append(_metric_table([(k, html.escape(k)) for k in metric_keys], base, forget))
    if meta_keys:
        parts.append("<h3>How the metrics were measured</h3>")
        parts.append(_metric_table([(k, html.escape(k)) for k in meta_keys], base, forget))
    return parts


def _classifiers_section(classifiers: Any) -> list[str]:
    """The run's evaluation classifiers, by seed and recipe hash (nothing when there are none)."""
    if not (isinstance(classifiers, list) and classifiers):
        return []
    rows = [
        {
            "seed": c.get("seed"),
            "recipe hash": c.get("recipe_hash"),
            "test accuracy": c.get("test_accuracy"),
            "cached": c.get("cached"),
            "file": c.get("path"),
        }
        for c in classifiers
        if isinstance(c, Mapping)
    ]
    return ["<h3>Evaluation classifiers used</h3>", _rows_table(rows)]


def _page_start(title: str) -> list[str]:
    """The page's head (title, style sheet) and its heading."""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]


def _closing_sections(report: Mapping[str, Any], environment: bool = True) -> list[str]:
    """Timings, the resolved config and (``environment``) the package versions, then the page's end."""
    parts = [
        "<h2>Timings (seconds)</h2>",
        _kv_table(report.get("timings"), ("stage", "seconds")),
        "<h2>Resolved config</h2>",
        f"<pre>{html.escape(_config_text(report.get('config')))}</pre>",
    ]
    if environment:
        parts += ["<h2>Environment</h2>", _kv_table(report.get("environment"), ("package", "version"))]
    return parts + ["</body></html>"]


T2I_TABLE_NOTE = (
    "Each cell: fraction of the concept's images that the MNIST judges call its digit (their probabilities "
    "averaged, argmax); a group's images are drawn from its forget prompts, a kept digit's from the "
    "world's captions of it. Bold: the concept is forgotten by that step, so the value should stay near 0 "
    "(a rise is rebound); for kept digits it is their accuracy (a fall is drift)."
)


def write_t2i_html_report(out_dir: Path, report: Mapping[str, Any], images: Mapping[str, str]) -> Path:
    """``out_dir/report.html`` of a text-to-image run that forgot ``t2i.concepts`` groups (at once, or one
    after another): the groups, the concept x step table when the world's judges measured it
    (``report["sequence"]`` or ``report["concepts_table"]``), the figures, timings and config."""
    out_dir = Path(out_dir)
    title = str(report.get("title") or f"Selective Amnesia: {report.get('name', 'text-to-image')}")
    parts = _page_start(title) + [
        f"<p>Forgotten model: {html.escape(str(report.get('output', MISSING)))}.</p>",
        "<h2>Concepts</h2>",
    ]
    rows = [
        {
            "concept": g.get("name"),
            "forget prompts": "; ".join(map(str, g.get("forget_prompts", []))),
            "surrogate": g.get("surrogate"),
            "forget conditions": g.get("forget_conditions"),
            "forgotten at step": g.get("step"),
        }
        for g in report.get("concepts", [])
        if isinstance(g, Mapping)
    ]
    parts.append(_rows_table(rows))
    sequence, table = report.get("sequence"), report.get("concepts_table")
    if isinstance(sequence, Mapping) and sequence.get("columns"):
        parts += _sequence_section(
            sequence, what="concept", title="Sequence: every concept after every step", note=T2I_TABLE_NOTE
        )
    elif isinstance(table, Mapping) and table.get("columns"):
        parts += _sequence_section(
            table, what="concept", title="Every concept before and after forgetting", note=T2I_TABLE_NOTE
        )
    else:
        why = report.get("measured", {}).get("why") if isinstance(report.get("measured"), Mapping) else None
        parts.append(f"<p>Not measured: {html.escape(str(why or MISSING))}.</p>")
    retention = report.get("retention")
    if isinstance(retention, Mapping) and retention:
        parts += [
            "<h2>Replay prompts: movement from the base model</h2>",
            _kv_table(retention, ("measure", "value")),
        ]
    parts += _figures(images, out_dir)
    parts += _closing_sections(report, environment=False)
    path = out_dir / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
