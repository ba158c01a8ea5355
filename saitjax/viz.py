"""Pictures a person would rather look at than a metrics file: curves, Pareto fronts, kept tokens.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), never
through ``pyplot``: nothing needs a display, no global backend is switched under the caller's
feet, and figures are not kept alive in pyplot's registry by a long-running training process.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from saitjax.metrics import read_metrics

MID_GREY = 0.5
_EVAL_TOP1 = re.compile(r"^eval/top1")


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, str):
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(value)
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``key``; after a resume the record written last wins for a step."""
    by_step: dict[int, float] = {}
    for record in records:
        value = _float_or_none(record.get(key))
        if value is not None and "step" in record:
            by_step[int(record["step"])] = value
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def _ema(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    out, acc = np.empty_like(values), None
    for i, value in enumerate(values):
        if math.isfinite(value):
            acc = value if acc is None else weight * acc + (1 - weight) * value
        out[i] = math.nan if acc is None else acc
    return out


def _save(fig: Figure, out_png: str) -> str:
    directory = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(directory, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, format="png", dpi=fig.dpi)
    return out_png


def _keys(records: Sequence[dict], predicate) -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            if key not in seen and predicate(key):
                seen[key] = None
    return sorted(seen)


def plot_training_curves(metrics: list[dict] | str, out_png: str, *,
                         title: str | None = None) -> str:
    """Loss terms, learning rate, every ``eval/top1*`` curve of a run and, for methods that learn
    their sparsity, the kept fractions and learned thresholds per stage; one panel each.

    ``metrics`` is a list of :func:`saitjax.metrics.read_metrics` records, or a workdir or
    ``metrics.jsonl`` path. Panels whose keys are absent are left out. Returns ``out_png``.
    """
    records = read_metrics(metrics) if isinstance(metrics, str) else list(metrics)
    loss_keys = _keys(records, lambda k: k.startswith("train/") and "loss" in k)
    eval_loss_keys = _keys(records, lambda k: k.startswith("eval/") and "loss" in k)
    top1_keys = _keys(records, lambda k: bool(_EVAL_TOP1.match(k)))
    kept_keys = _keys(records, lambda k: k.startswith("train/kept_fraction_"))
    threshold_keys = _keys(records, lambda k: k.startswith("train/threshold_"))
    panels = []
    if loss_keys or eval_loss_keys:
        panels.append("loss")
    if any("train/lr" in r for r in records):
        panels.append("lr")
    if top1_keys:
        panels.append("top1")
    if kept_keys:
        panels.append("kept")
    if threshold_keys:
        panels.append("thresholds")

    fig = Figure(figsize=(5.0 * max(1, len(panels)), 3.8), dpi=100, layout="constrained")
    if title:
        fig.suptitle(title)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no train/loss, train/lr or eval/top1 metrics", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, out_png)

    axes = {name: fig.add_subplot(1, len(panels), i + 1) for i, name in enumerate(panels)}
    if "loss" in axes:
        ax = axes["loss"]
        for key in loss_keys:
            steps, values = _series(records, key)
            if not np.isfinite(values).any():
                continue
            if len(steps) > 100:  # Noisy per-step losses: faint raw curve plus a smoothed one.
                (line,) = ax.plot(steps, values, alpha=0.3, linewidth=0.8)
                weight = min(0.95, 1.0 - 10.0 / len(steps))  # Averages over ~n/10 points at most.
                ax.plot(steps, _ema(values, weight), color=line.get_color(), label=key)
            else:
                ax.plot(steps, values, marker=".", label=key)
        for key in eval_loss_keys:
            steps, values = _series(records, key)
            if not np.isfinite(values).any():
                continue
            ax.plot(steps, values, marker="o", linestyle="--", label=key)
        ax.set_title("loss")
    if "lr" in axes:
        ax = axes["lr"]
        steps, values = _series(records, "train/lr")
        ax.plot(steps, values)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_title("learning rate")
    if "top1" in axes:
        ax = axes["top1"]
        for key in top1_keys:
            steps, values = _series(records, key)
            label = key[len("eval/top1"):].lstrip("@/_") or "top1"
            ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.set_title("eval top-1")
    for name, keys, title in (("kept", kept_keys, "kept fraction of the patch tokens (train)"),
                              ("thresholds", threshold_keys, "learned thresholds")):
        if name in axes:
            for key in keys:
                steps, values = _series(records, key)
                axes[name].plot(steps, values, label="stage " + key.rsplit("_", 1)[1])
            axes[name].set_title(title)
    for ax in axes.values():
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0] and ax is not axes.get("lr"):
            ax.legend(fontsize="small")
    return _save(fig, out_png)


def _error_bar(row: dict, y: str) -> float:
    """What the bar around ``row[y]`` shows: ``{y}_err`` when given (e.g. sd over seeds), else
    ``{y}_se``, else, for a top-1 in [0, 1] measured on ``count`` images, its binomial standard error."""
    for key in (f"{y}_err", f"{y}_se"):
        value = _float_or_none(row.get(key))
        if value is not None:
            return value
    value, count = _float_or_none(row.get(y)), _float_or_none(row.get("count"))
    if value is not None and count and 0.0 <= value <= 1.0:
        from saitjax.run_results import standard_error

        return standard_error(value, count)
    return 0.0


def frontier(points: Sequence[tuple[float, float]], cost_is_lower_better: bool = True) -> list[int]:
    """Indices of the points no cheaper point beats, sorted by cost (the Pareto frontier of
    accuracy against cost). Points off it are drawn but not joined: joining every point in cost
    order turns measurement noise into a zigzag that reads as a trend."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0] if cost_is_lower_better else -points[i][0],
                                                       -points[i][1]))
    kept, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            kept.append(i)
            best = points[i][1]
    return kept


def _pareto_panel(ax, rows: Sequence[dict], x: str, y: str, label: str, group: str | None,
                  dense_y: float | None) -> None:
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get(group) if group else None, []).append(row)
    cheaper_is_better = x != "img_per_s"  # throughput: more is better
    for name, members in groups.items():
        xs = [float(r[x]) for r in members]
        ys = [float(r[y]) for r in members]
        bars = ax.errorbar(xs, ys, yerr=[_error_bar(r, y) for r in members], fmt="o", capsize=3,
                           label=None if name is None else str(name))
        best = frontier(list(zip(xs, ys)), cheaper_is_better)
        ax.plot([xs[i] for i in best], [ys[i] for i in best], "-", color=bars[0].get_color(), alpha=0.6)
        for row, xv, yv in zip(members, xs, ys):
            if label in row:
                ax.annotate(str(row[label]), (xv, yv), textcoords="offset points",
                            xytext=(4, 4), fontsize="x-small")
    if dense_y is not None:
        ax.axhline(dense_y, linestyle="--", color="grey", linewidth=1,
                   label=f"densest: {dense_y:.4g}")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def plot_pareto(rows: list[dict], out_png: str, *, x: str = "gflops", y: str = "top1",
                label: str = "spec", title: str | None = None, group: str | None = None,
                reference_line: bool = True) -> str:
    """Accuracy vs compute of a density sweep, plus accuracy vs ``img_per_s`` when measured.

    Each point is annotated with ``row[label]`` and carries an error bar (:func:`_error_bar`:
    ±1 standard error over the test images unless the row gives its own); a line joins only the
    :func:`frontier` (the points no cheaper point beats). The dashed line marks the accuracy of
    the densest point (largest ``x``), i.e. what pruning trades away (``reference_line=False``:
    none, e.g. for several runs with a dense point each). ``group`` (optional) names a key that
    splits the rows into separate series, e.g. one per pruning rule.
    """
    points = [r for r in rows if _float_or_none(r.get(x)) is not None
              and _float_or_none(r.get(y)) is not None]
    if not points:
        raise ValueError(f"no row has both {x!r} and {y!r}")
    dense_y = float(max(points, key=lambda r: float(r[x]))[y]) if reference_line else None
    speed = [r for r in points if _float_or_none(r.get("img_per_s")) is not None]
    panels = 2 if speed and x != "img_per_s" else 1
    fig = Figure(figsize=(5.5 * panels, 4.2), dpi=100, layout="constrained")
    if title:
        fig.suptitle(title)
    _pareto_panel(fig.add_subplot(1, panels, 1), points, x, y, label, group, dense_y)
    if panels == 2:
        _pareto_panel(fig.add_subplot(1, panels, 2), speed, "img_per_s", y, label, group, dense_y)
    return _save(fig, out_png)


def plot_count_histograms(rows: list[dict], out_png: str, *, label: str = "density",
                          title: str | None = None) -> str:
    """How many images end with each number of patch tokens, one step line per row.

    Each row holds ``count_histogram`` (images per final count 0..N, as the evaluator reports
    it for per-image rules) and ``row[label]`` for the legend, with the mean count.
    """
    if not rows:
        raise ValueError("no row has a count_histogram")
    fig = Figure(figsize=(6.5, 3.8), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for row in rows:
        hist = np.asarray(row["count_histogram"], np.float64)
        counts = np.arange(len(hist))
        mean = float((hist * counts).sum() / max(hist.sum(), 1.0))
        ax.step(counts, hist, where="mid", label=f"{row.get(label, '')} (mean {mean:.1f})")
    ax.set_xlabel("patch tokens kept after the last stage")
    ax.set_ylabel("images")
    ax.set_title(title or "per-image token counts")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out_png)


def _as_unit_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    return image


def grey_out_pruned(image: np.ndarray, keep_mask_grid: np.ndarray, patch_size: int,
                    strength: float = 0.7) -> np.ndarray:
    """Blend pruned patches ``strength`` of the way to mid grey; kept patches stay as they were.

    ``image`` is ``[H, W, C]``, float in [0, 1] (dtype kept) or uint8 (returned as float32 in
    [0, 1]); ``keep_mask_grid`` is ``[H // p, W // p]`` or flattened row-major, nonzero = kept.
    Pixels past the last whole patch are left unchanged. The input is not modified.
    """
    image = _as_unit_float(image)
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W, C], got shape {image.shape}")
    height, width = image.shape[0] // patch_size, image.shape[1] // patch_size
    mask = np.asarray(keep_mask_grid)
    if mask.size != height * width:
        raise ValueError(f"keep mask has {mask.size} entries but a {image.shape[:2]} image has "
                         f"{height}x{width} patches of {patch_size} px")
    kept = mask.reshape(height, width) != 0
    kept_pixels = np.ones(image.shape[:2], dtype=bool)
    kept_pixels[:height * patch_size, :width * patch_size] = np.repeat(
        np.repeat(kept, patch_size, axis=0), patch_size, axis=1)
    strength = np.asarray(strength, dtype=image.dtype)
    blended = image + strength * (np.asarray(MID_GREY, dtype=image.dtype) - image)
    return np.where(kept_pixels[..., None], image, blended)


def paint_token_groups(image: np.ndarray, source: np.ndarray, patch_size: int) -> np.ndarray:
    """Draw what became of each patch: merged or fused patches take their group's mean colour,
    discarded ones (``source == -1``) are greyed, patches with a token of their own stay as they
    were. ``source`` is ``aux["source"]`` of one image (the token holding each patch, row-major).
    """
    image = _as_unit_float(image)
    height, width = image.shape[0] // patch_size, image.shape[1] // patch_size
    source = np.asarray(source).reshape(-1)
    if source.size != height * width:
        raise ValueError(f"source map has {source.size} entries but the image has {height}x{width} patches")
    patches = image[:height * patch_size, :width * patch_size].reshape(
        height, patch_size, width, patch_size, -1).transpose(0, 2, 1, 3, 4).reshape(height * width, patch_size,
                                                                                     patch_size, -1)
    out = patches.copy()
    for group in np.unique(source[source >= 0]):
        members = np.flatnonzero(source == group)
        if len(members) > 1:
            out[members] = patches[members].mean(axis=(0, 1, 2))
    out[source < 0] = patches[source < 0] + 0.7 * (MID_GREY - patches[source < 0])
    painted = image.copy()
    painted[:height * patch_size, :width * patch_size] = out.reshape(
        height, width, patch_size, patch_size, -1).transpose(0, 2, 1, 3, 4).reshape(
        height * patch_size, width * patch_size, -1)
    return painted


def plot_kept_tokens(images: np.ndarray, keep_masks: list[np.ndarray], row_labels: list[str],
                     out_png: str, *, patch_size: int, max_images: int = 8,
                     sources: list[np.ndarray | None] | None = None) -> str:
    """One row per density, one column per image, pruned patches greyed out.

    ``images`` is ``[n, H, W, 3]`` in [0, 1] or uint8 (undo any mean/std normalisation first;
    floats are clipped to [0, 1]); ``keep_masks[i]`` is ``[n, (H // p) * (W // p)]`` 0/1, the
    ``aux["keep_masks"]`` convention of the models (patch tokens only, original order). Each
    panel's title is the fraction of tokens it keeps. ``sources[i]`` (optional, ``[n, N_p]``:
    ``aux["source"]``) draws merged and fused patches in their group's mean colour instead
    (:func:`paint_token_groups`), titled with the number of tokens left.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [n, H, W, C], got shape {images.shape}")
    if len(keep_masks) != len(row_labels):
        raise ValueError(f"{len(keep_masks)} keep masks but {len(row_labels)} row labels")
    if not keep_masks:
        raise ValueError("need at least one keep mask")
    cols = min(images.shape[0], max_images)
    rows = len(keep_masks)
    masks = [np.asarray(m).reshape(np.asarray(m).shape[0], -1) for m in keep_masks]
    for label, mask in zip(row_labels, masks):
        if mask.shape[0] < cols:
            raise ValueError(f"keep mask {label!r} covers {mask.shape[0]} images, need {cols}")
    height, width = images.shape[1], images.shape[2]
    fig = Figure(figsize=(1.9 * cols + 0.6, 2.0 * rows), dpi=100, layout="constrained")
    for r, (label, mask) in enumerate(zip(row_labels, masks)):
        for c in range(cols):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            source = None if sources is None or sources[r] is None else np.asarray(sources[r])[c]
            if source is None:
                shown = grey_out_pruned(images[c], mask[c], patch_size)
                title = f"{100.0 * np.mean(mask[c] != 0):.0f}% kept"
            else:
                shown = paint_token_groups(images[c], source, patch_size)
                title = f"{len(np.unique(source[source >= 0]))} tokens"
            shown = np.clip(shown, 0.0, 1.0)
            ax.imshow(shown, interpolation="nearest")
            edges_x = np.arange(patch_size, width, patch_size) - 0.5
            edges_y = np.arange(patch_size, height, patch_size) - 0.5
            ax.vlines(edges_x, -0.5, height - 0.5, colors="white", linewidths=0.3, alpha=0.35)
            ax.hlines(edges_y, -0.5, width - 0.5, colors="white", linewidths=0.3, alpha=0.35)
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize="x-small")
            if c == 0:
                ax.set_ylabel(label, fontsize="small")
    return _save(fig, out_png)


def plot_semantic_attention(images: np.ndarray, attention: np.ndarray, sources: np.ndarray, out_png: str, *,
                            patch_size: int, max_images: int = 4, title: str | None = None) -> str:
    """What each semantic token (STViT) looked at: one row per image, its patches painted by the
    token they joined, then one heat map per token over the image.

    ``attention [n, T, N_p]`` is ``aux["semantic_attention"][-1]`` (head-mean attention of each
    semantic token to the image tokens in the last block that read them); ``sources [n, N_p]``
    is ``aux["source"]``.
    """
    images, attention = np.asarray(images), np.asarray(attention, np.float32)
    if images.ndim != 4 or attention.ndim != 3 or attention.shape[0] < min(len(images), max_images):
        raise ValueError(f"need images [n, H, W, C] and attention [n, T, N_p], got {images.shape} and {attention.shape}")
    rows, tokens = min(len(images), max_images), attention.shape[1]
    height, width = images.shape[1] // patch_size, images.shape[2] // patch_size
    if attention.shape[2] != height * width:
        raise ValueError(f"attention covers {attention.shape[2]} patches but the images have {height}x{width}")
    fig = Figure(figsize=(1.2 * (tokens + 1) + 0.4, 1.3 * rows + 0.4), dpi=100, layout="constrained")
    for r in range(rows):
        panels = [(paint_token_groups(images[r], sources[r], patch_size), None, "groups")]
        for t in range(tokens):
            heat = attention[r, t].reshape(height, width)
            panels.append((_as_unit_float(images[r]), np.kron(heat / max(heat.max(), 1e-12),
                                                              np.ones((patch_size, patch_size))), f"token {t}"))
        for c, (shown, heat, label) in enumerate(panels):
            ax = fig.add_subplot(rows, tokens + 1, r * (tokens + 1) + c + 1)
            ax.imshow(np.clip(shown, 0.0, 1.0) * (0.35 if heat is not None else 1.0), interpolation="nearest")
            if heat is not None:
                ax.imshow(heat, cmap="inferno", alpha=0.65, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="small")
    return _save(fig, out_png)
