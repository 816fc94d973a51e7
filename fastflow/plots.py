"""Pictures of flows, written as PNG files with matplotlib.

matplotlib is an optional extra (``pip install 'fastflow[plot]'``): it is imported when a
function here is called, never by ``import fastflow``, and its absence raises an
``ImportError`` that says how to install it. The figures are drawn with matplotlib's
object-oriented API on the Agg canvas, so no window opens and the global pyplot state and
backend are left alone.

* :func:`plot_density` — a 2-D model's density on a grid, computed from ``log_prob``, beside a
  histogram of the data (and of the model's samples, where it can sample).
* :func:`plot_samples` — a scatter plot of 2-D points (samples, optionally over the data).
* :func:`plot_image_grid` — images ``[N, C, H, W]`` in a grid.
* :func:`plot_temperature_grid` — an image model's samples at several temperatures, one row
  per temperature (Glow's reduced-temperature sampling).
* :func:`plot_training_curve` — training loss per step and held-out evaluations.

Each function returns the path it wrote.

Example:
    >>> import tempfile, os
    >>> from fastflow.models import RealNVP
    >>> from fastflow.data import toy_data
    >>> path = os.path.join(tempfile.mkdtemp(), "density.png")
    >>> plot_density(RealNVP(2, n_couplings=2, hidden=8), toy_data("moons", 500, seed=0), path) == path
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "density_grid",
    "plot_density",
    "plot_samples",
    "plot_image_grid",
    "plot_temperature_grid",
    "plot_training_curve",
]


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no window)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "fastflow.plots needs matplotlib: pip install 'fastflow[plot]' (or pip install matplotlib)"
        ) from exc
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _bounds(data: Tensor, pad: float = 0.15) -> tuple[float, float, float, float]:
    lo = data.min(0).values
    hi = data.max(0).values
    margin = pad * (hi - lo).clamp_min(1e-3)
    lo, hi = lo - margin, hi + margin
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def _check_points(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of 2-D points [N, 2], got {shape}")
    return x.detach().float().cpu()


@torch.no_grad()
def density_grid(
    model: torch.nn.Module,
    bounds: Sequence[float],
    n: int = 200,
    batch_size: int = 8192,
    log_prob: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``log p`` of a 2-D model on an ``n x n`` grid over ``bounds = (x0, x1, y0, y1)``.

    Returns ``(xs, ys, logp)`` with ``logp[i, j] = log p(xs[j], ys[i])`` (rows are ``y``, as
    ``imshow(origin="lower")`` expects). The model is put in eval mode for the call and its
    mode restored; ``log_prob`` replaces ``model.log_prob`` (e.g. to undo a normalisation).
    """
    x0, x1, y0, y1 = (float(b) for b in bounds)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    xs = torch.linspace(x0, x1, n)
    ys = torch.linspace(y0, y1, n)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    fn = log_prob if log_prob is not None else model.log_prob
    was_training = model.training
    model.eval()
    try:
        parts = [fn(chunk.to(device)).float().cpu() for chunk in grid.split(batch_size)]
    finally:
        model.train(was_training)
    return xs, ys, torch.cat(parts).reshape(n, n)


def plot_density(
    model: torch.nn.Module,
    data: Tensor,
    path: str | os.PathLike,
    *,
    bounds: Sequence[float] | None = None,
    n_grid: int = 200,
    samples: Tensor | None | bool = True,
    title: str | None = None,
    log_prob: Callable[[Tensor], Tensor] | None = None,
) -> str:
    """A 2-D model's density beside the data: panels "data" (a 2-D histogram of ``data``),
    "model density" (``exp(log p)`` on the grid, from ``log_prob``; the range is the data's
    with a margin unless ``bounds`` is given) and, with ``samples=True`` (draw as many as
    there are data points) or a tensor of points, "model samples".

    A model that cannot sample (an error from ``sample``) gets no samples panel.

    Arguments:
        model: a flow over 2-D points with ``log_prob`` (and ``sample``).
        data: points ``[N, 2]``.
        path: the PNG file to write (its directory is created).
        bounds: ``(x0, x1, y0, y1)`` of the grid and every panel.
        n_grid: grid points per axis.
        samples: True, False/None, or points ``[M, 2]``.
        title: the density panel's title (default "model density").
        log_prob: replaces ``model.log_prob`` on the grid.
    """
    data = _check_points(data, "data")
    extent = tuple(bounds) if bounds is not None else _bounds(data)
    _, _, logp = density_grid(model, extent, n_grid, log_prob=log_prob)
    if samples is True:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                samples = model.sample(data.shape[0])
        except Exception:  # noqa: BLE001 - the picture is still useful without samples
            samples = None
        finally:
            model.train(was_training)
    elif samples is False:
        samples = None
    if samples is not None:
        samples = _check_points(samples, "samples")
    panels = 3 if samples is not None else 2
    aspect = (extent[3] - extent[2]) / max(extent[1] - extent[0], 1e-9)
    fig = _figure(4.0 * panels, 4.0 * min(max(aspect, 0.4), 2.5) + 0.5)
    axes = fig.subplots(1, panels)
    hist_range = [list(extent[:2]), list(extent[2:])]
    axes[0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=120, range=hist_range, cmap="viridis")
    axes[0].set_title(f"data ({data.shape[0]} points)")
    density = torch.nan_to_num(logp, nan=-math.inf).exp()
    axes[1].imshow(density.numpy(), origin="lower", extent=extent, cmap="viridis", aspect="auto")
    axes[1].set_title(title or "model density")
    if samples is not None:
        axes[2].hist2d(samples[:, 0].numpy(), samples[:, 1].numpy(), bins=120, range=hist_range, cmap="viridis")
        axes[2].set_title(f"model samples ({samples.shape[0]})")
    for ax in axes:
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


def plot_samples(
    samples: Tensor,
    path: str | os.PathLike,
    *,
    data: Tensor | None = None,
    bounds: Sequence[float] | None = None,
    title: str | None = None,
) -> str:
    """A scatter plot of 2-D ``samples`` ``[N, 2]`` (over ``data`` in grey, when given)."""
    samples = _check_points(samples, "samples")
    fig = _figure(5, 5)
    ax = fig.subplots()
    if data is not None:
        data = _check_points(data, "data")
        ax.scatter(data[:, 0].numpy(), data[:, 1].numpy(), s=2, c="0.75", label="data", rasterized=True)
    ax.scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=2, c="tab:blue", label="samples", rasterized=True)
    extent = tuple(bounds) if bounds is not None else _bounds(samples if data is None else torch.cat([samples, data]))
    ax.set_xlim(extent[:2])
    ax.set_ylim(extent[2:])
    ax.set_aspect("equal")
    if data is not None:
        ax.legend(loc="upper right", markerscale=4)
    ax.set_title(title or f"{samples.shape[0]} samples")
    fig.tight_layout()
    return _save(fig, path)


def _to_display(images: Tensor, value_range: tuple[float, float]) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [N, C, H, W] with C = 1 or 3, got {shape}")
    lo, hi = value_range
    x = (images.detach().float().cpu() - lo) / (hi - lo)
    return x.clamp(0, 1)


def _draw_images(axes_row, images: Tensor) -> None:
    for ax, img in zip(axes_row, images):
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
    for ax in axes_row:
        ax.set_xticks([])
        ax.set_yticks([])


def plot_image_grid(
    images: Tensor,
    path: str | os.PathLike,
    *,
    n_cols: int | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    title: str | None = None,
) -> str:
    """Images ``[N, C, H, W]`` (``C`` 1 or 3) in a grid of ``n_cols`` columns (default about
    ``sqrt(N)``); values are mapped from ``value_range`` to black..white and clipped."""
    x = _to_display(images, value_range)
    n = x.shape[0]
    cols = n_cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    fig = _figure(0.9 * cols, 0.9 * rows + (0.4 if title else 0))
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    _draw_images(flat, x)
    for ax in flat[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_temperature_grid(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    temperatures: Sequence[float] = (0.0, 0.5, 0.7, 0.85, 1.0),
    n_per_row: int = 10,
    value_range: tuple[float, float] = (-0.5, 0.5),
    seed: int = 0,
    postprocess: Callable[[Tensor], Tensor] | None = None,
) -> str:
    """Samples of an image model at each temperature, one row per temperature (the same seed
    for every row, so columns correspond). ``postprocess`` maps samples to images
    ``[N, C, H, W]`` first (e.g. a reshape for a flattened model); values are shown over
    ``value_range``. The global torch generator is left as it was."""
    rows = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for t in temperatures:
                torch.manual_seed(seed)
                x = model.sample(n_per_row, temperature=float(t))
                rows.append(_to_display(postprocess(x) if postprocess else x, value_range))
    finally:
        model.train(was_training)
    fig = _figure(0.85 * n_per_row + 0.8, 0.9 * len(rows))
    axes = fig.subplots(len(rows), n_per_row, squeeze=False)
    for r, (t, images) in enumerate(zip(temperatures, rows)):
        _draw_images(axes[r], images)
        axes[r][0].set_ylabel(f"T={float(t):g}", rotation=0, ha="right", va="center")
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curve(
    history: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    unit: str = "nats",
    smooth: int = 50,
) -> str:
    """The training curve: ``history["loss"]`` (one loss per step, drawn raw and as a running
    mean over ``smooth`` steps) and ``history["eval"]`` (a list of ``{"step", "value"}``
    held-out evaluations), against the step; ``unit`` labels the y axis."""
    losses = torch.as_tensor(list(history.get("loss", [])), dtype=torch.float64)
    evals = list(history.get("eval", []))
    if losses.numel() == 0 and not evals:
        raise ValueError("history has no losses and no evaluations to draw")
    fig = _figure(6.5, 4)
    ax = fig.subplots()
    if losses.numel():
        steps = torch.arange(1, losses.numel() + 1)
        finite = torch.isfinite(losses)
        ax.plot(steps[finite].numpy(), losses[finite].numpy(), color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        k = max(1, min(int(smooth), losses.numel()))
        if k > 1:
            kernel = torch.ones(1, 1, k, dtype=torch.float64) / k
            run = torch.nn.functional.conv1d(losses.nan_to_num().view(1, 1, -1), kernel).view(-1)
            ax.plot(steps[k - 1 :].numpy(), run.numpy(), color="tab:blue", lw=1.5, label=f"train (mean of {k})")
        if finite.any():  # the first steps' losses can be far above the rest: clip them
            lo, hi = torch.quantile(losses[finite], torch.tensor([0.01, 0.98], dtype=torch.float64)).tolist()
            values = [e["value"] for e in evals if math.isfinite(e["value"])]
            lo, hi = min([lo, *values]), max([hi, *values])
            pad = 0.1 * (hi - lo + 1e-9)
            ax.set_ylim(lo - pad, hi + pad)
    if evals:
        ax.plot([e["step"] for e in evals], [e["value"] for e in evals], "o-", color="tab:orange", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel(f"negative log-likelihood ({unit})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)
