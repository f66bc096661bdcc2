"""Plots of training curves, learned prompt embeddings and task metrics.

Every function builds and returns a `matplotlib.figure.Figure` without going through pyplot, so it is
safe headless (no display, any backend) and is never shown twice in a notebook. To look at one, make it
the value of a notebook cell or call `IPython.display.display(fig)`; to keep one, `fig.savefig(path)`.

Prompt tensors are (V, D): V virtual tokens of hidden size D; vocabulary embeddings are (N, D).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

VOCAB_COLOR = "0.75"  # light grey: the vocabulary is the backdrop, the prompts are the subject


# --------------------------------------------------------------------------------------------------
# helpers


def _as_float_tensor(x) -> torch.Tensor:
    """A detached float32 CPU copy (bf16/fp16 and GPU tensors cannot go to numpy directly)."""
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float32)


def _task_colors(names: Sequence[str]) -> dict[str, tuple]:
    """One distinct colour per task, in the given order (tab10, then tab20 for many tasks)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _check_prompts(prompts: Mapping[str, torch.Tensor], hidden: int | None = None) -> dict[str, torch.Tensor]:
    """Prompts as float (V, D) tensors; ValueError when empty, not 2-D, or of the wrong width."""
    if not prompts:
        raise ValueError("no prompts to plot: pass a dict {taskname: tensor (V, D)}")
    checked = {}
    for name, prompt in prompts.items():
        tensor = _as_float_tensor(prompt)
        if tensor.dim() != 2:
            raise ValueError(f"prompt of task {name!r} has shape {tuple(tensor.shape)}; expected (V, D)")
        if hidden is not None and tensor.shape[1] != hidden:
            raise ValueError(
                f"prompt of task {name!r} has hidden size {tensor.shape[1]} but the vocabulary has {hidden}"
            )
        checked[name] = tensor
    return checked


def _annotate_cells(ax, values: np.ndarray, texts: list[list[str]], im, fontsize: float = 8) -> None:
    """Write texts[i][j] on heatmap cell (i, j), black on light cells and white on dark ones."""
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            r, g, b, _ = im.cmap(im.norm(values[i, j]))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # perceived luminance
            # parse_math=False: tokens such as "$" must be drawn literally, not as mathtext.
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black", parse_math=False)


# --------------------------------------------------------------------------------------------------
# training curves


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with TensorBoard-style bias correction.

    The correction divides by (1 - weight**t), so the first points are not dragged towards zero.
    """
    smoothed, average = [], 0.0
    for t, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**t))
    return smoothed


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every history entry holding a number under key; step defaults to position."""
    steps, values = [], []
    for position, entry in enumerate(history, start=1):
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(entry.get("step", position))
            values.append(float(value))
    return steps, values


def _validation_metric_keys(history: list[dict]) -> list[str]:
    """Keys like "val/sentiment/accuracy" or "val_accuracy" (not the loss), in first-seen order."""
    keys = []
    for entry in history:
        for key in entry:
            is_val = key.startswith(("val/", "val_"))
            if is_val and key not in ("val_loss", "val/loss") and key not in keys:
                keys.append(key)
    return keys


def plot_training_curves(history: list[dict], smoothing: float = 0.9) -> Figure:
    """Panels of training loss (raw and smoothed), learning rate, validation loss and metrics.

    history: per-step dicts such as {"step": 1, "loss": 2.3, "lr": 1e-3}; validation entries such as
    {"step": 50, "val_loss": 2.0, "val/sentiment/accuracy": 0.8} may be separate or merged in. A panel
    appears only when its data is present. Validation metrics share one panel; note that SQuAD scores
    are percentages while the others are fractions.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    panels = []
    if _series(history, "loss")[1]:
        panels.append(_draw_train_loss)
    if _series(history, "lr")[1]:
        panels.append(_draw_lr)
    if _series(history, "val_loss")[1] or _series(history, "val/loss")[1]:
        panels.append(_draw_val_loss)
    if _validation_metric_keys(history):
        panels.append(_draw_val_metrics)
    if not panels:
        raise ValueError("history has no 'loss', 'lr', 'val_loss' or 'val/...' values to plot")

    rows, cols = (1, len(panels)) if len(panels) <= 2 else (2, 2)
    fig = Figure(figsize=(5.5 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, draw in zip(axes, panels):
        draw(ax, history, smoothing)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Training curves")
    return fig


def _draw_train_loss(ax, history: list[dict], smoothing: float) -> None:
    steps, losses = _series(history, "loss")
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="raw")
    ax.plot(steps, smooth(losses, smoothing), color="tab:blue", linewidth=2,
            label=f"smoothed (EMA {smoothing})")
    ax.set_title("Training loss")
    ax.set_ylabel("loss")
    ax.legend()


def _draw_lr(ax, history: list[dict], smoothing: float) -> None:
    steps, rates = _series(history, "lr")
    ax.plot(steps, rates, color="tab:green", label="learning rate")
    ax.set_title("Learning rate")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def _draw_val_loss(ax, history: list[dict], smoothing: float) -> None:
    key = "val_loss" if _series(history, "val_loss")[1] else "val/loss"
    steps, losses = _series(history, key)
    ax.plot(steps, losses, marker="o", color="tab:orange", label="validation loss")
    ax.set_title("Validation loss")
    ax.set_ylabel("loss")


def _draw_val_metrics(ax, history: list[dict], smoothing: float) -> None:
    for key in _validation_metric_keys(history):
        steps, values = _series(history, key)
        label = key.removeprefix("val/").removeprefix("val_")
        ax.plot(steps, values, marker="o", label=label)
    ax.set_title("Validation metrics")
    ax.set_ylabel("score (higher is better)")
    ax.legend(fontsize=8)


# --------------------------------------------------------------------------------------------------
# prompt embeddings


def pca_2d(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit a 2-component PCA.

    points: (M, D). Returns (coords (M, 2), mean (D,), components (2, D), explained variance ratio (2,)).
    Component signs are fixed (largest-magnitude loading positive) so plots do not flip between runs.
    """
    x = _as_float_tensor(points)
    mean = x.mean(dim=0)
    centered = x - mean
    # Full SVD of the (M, D) sample is exact and cheap at a few thousand rows; pca_lowrank is randomised.
    _, singular, vh = torch.linalg.svd(centered, full_matrices=False)
    components = vh[:2]
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * signs
    variance = singular**2
    ratio = variance[:2] / variance.sum().clamp_min(1e-12)
    if components.shape[0] < 2:  # one point or D == 1: pad so callers always get two axes
        pad = 2 - components.shape[0]
        components = torch.cat([components, torch.zeros(pad, x.shape[1])])
        ratio = torch.cat([ratio, torch.zeros(pad)])
    return centered @ components.T, mean, components, ratio


def _sample_rows(vocab: torch.Tensor, sample: int, seed: int) -> torch.Tensor:
    """`sample` distinct rows of vocab (all of them when it has fewer), chosen reproducibly by seed."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(vocab.shape[0], generator=generator)
    return vocab[order[: min(sample, vocab.shape[0])]]


def plot_prompt_pca(
    prompts: Mapping[str, torch.Tensor],
    vocab_embeddings: torch.Tensor,
    sample: int = 2000,
    seed: int = 0,
    annotate: bool = True,
) -> Figure:
    """2-D PCA of learned prompts against the vocabulary embeddings they live among.

    prompts: {taskname: (V, D)}; vocab_embeddings: (N, D). The PCA is fit on `sample` random vocabulary
    rows plus all prompt rows together. Vocabulary points are light grey; each task's virtual tokens
    are coloured markers labelled with their index (0..V-1) when `annotate`.
    """
    vocab = _as_float_tensor(vocab_embeddings)
    checked = _check_prompts(prompts, hidden=vocab.shape[1])
    vocab_sample = _sample_rows(vocab, sample, seed)
    coords, _, _, ratio = pca_2d(torch.cat([vocab_sample, *checked.values()]))  # (S + sum V, 2)

    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    n_vocab = vocab_sample.shape[0]
    vocab_xy = coords[:n_vocab].numpy()
    ax.scatter(vocab_xy[:, 0], vocab_xy[:, 1], s=4, color=VOCAB_COLOR,
               label=f"vocabulary ({n_vocab} sampled)")

    colors = _task_colors(list(checked))
    start = n_vocab
    for name, prompt in checked.items():
        xy = coords[start : start + prompt.shape[0]].numpy()
        start += prompt.shape[0]
        ax.scatter(xy[:, 0], xy[:, 1], s=45, color=colors[name], edgecolors="black", linewidths=0.5,
                   label=f"{name} ({prompt.shape[0]} virtual tokens)", zorder=3)
        if annotate:
            for index, (x, y) in enumerate(xy):
                ax.annotate(str(index), (x, y), xytext=(4, 4), textcoords="offset points",
                            fontsize=7, color=colors[name], zorder=4)

    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)")
    ax.set_title("Prompt embeddings among the vocabulary (PCA)")
    ax.legend(loc="best", fontsize=8, markerscale=1.5)
    return fig


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of a (M, D) with every row of b (N, D): (M, N)."""
    a_unit = torch.nn.functional.normalize(_as_float_tensor(a), dim=-1)
    b_unit = torch.nn.functional.normalize(_as_float_tensor(b), dim=-1)
    return a_unit @ b_unit.T


def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Readable text for token ids: convert_ids_to_tokens when the tokenizer has it, else decode."""
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return [tokenizer.decode([i]) for i in ids]


def nearest_tokens(
    prompt: torch.Tensor, vocab_embeddings: torch.Tensor, tokenizer, k: int = 5
) -> list[list[tuple[str, float]]]:
    """For each virtual token, the k vocabulary tokens with the highest cosine similarity.

    prompt: (V, D); vocab_embeddings: (N, D). Returns V lists of (token text, similarity), best first;
    k is capped at N.
    """
    similarity = cosine_similarity_matrix(prompt, vocab_embeddings)  # (V, N)
    values, ids = similarity.topk(min(k, similarity.shape[1]), dim=1)  # (V, k) each
    result = []
    for row_values, row_ids in zip(values.tolist(), ids.tolist()):
        result.append(list(zip(_token_texts(tokenizer, row_ids), row_values)))
    return result


def _display_token(token: str, max_chars: int = 14) -> str:
    """Token text made visible in a cell: whitespace escaped, long tokens shortened with an ellipsis."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    text = text if text.strip() else repr(text)  # a bare space would be an empty-looking cell
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def plot_nearest_tokens(
    prompt: torch.Tensor,
    vocab_embeddings: torch.Tensor,
    tokenizer,
    k: int = 5,
    title: str = "Nearest vocabulary tokens to each virtual token",
) -> Figure:
    """Heatmap of `nearest_tokens`: row = virtual token, column = rank, colour = cosine similarity.

    Each cell is annotated with the token text; prompt (V, D), vocab_embeddings (N, D).
    """
    neighbours = nearest_tokens(prompt, vocab_embeddings, tokenizer, k)
    values = np.array([[sim for _, sim in row] for row in neighbours])  # (V, k)
    texts = [[_display_token(tok) for tok, _ in row] for row in neighbours]
    n_rows, n_cols = values.shape

    fig = Figure(figsize=(1.3 * n_cols + 2.5, 0.38 * n_rows + 1.6), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    _annotate_cells(ax, values, texts, im)
    ax.set_xticks(range(n_cols), [f"#{rank}" for rank in range(1, n_cols + 1)])
    ax.set_yticks(range(n_rows), [f"virtual {i}" for i in range(n_rows)])
    ax.set_xlabel("rank of neighbour")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="cosine similarity")
    return fig


def task_similarity(prompts: Mapping[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """Cosine similarity between tasks, each task represented by its mean prompt vector.

    prompts: {taskname: (V_t, D)}, V_t may differ between tasks. Averaging over virtual tokens makes
    prompts of different lengths comparable and ignores token order. Returns (names, matrix (T, T)).
    """
    checked = _check_prompts(prompts)
    widths = {tensor.shape[1] for tensor in checked.values()}
    if len(widths) > 1:
        raise ValueError(f"prompts have different hidden sizes {sorted(widths)}; cannot compare them")
    means = torch.stack([tensor.mean(dim=0) for tensor in checked.values()])  # (T, D)
    return list(checked), cosine_similarity_matrix(means, means)


def plot_task_similarity(prompts: Mapping[str, torch.Tensor]) -> Figure:
    """Task-by-task heatmap of `task_similarity` (cosine of mean prompt vectors), values annotated."""
    names, matrix = task_similarity(prompts)
    values = matrix.numpy()
    size = 1.0 * len(names) + 3.0
    fig = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = fig.subplots()
    # A fixed -1..1 scale so colours mean the same thing in every plot.
    im = ax.imshow(values, cmap="coolwarm", vmin=-1, vmax=1)
    _annotate_cells(ax, values, [[f"{v:.2f}" for v in row] for row in values], im, fontsize=11)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_title("Task similarity\n(cosine of mean prompt vectors)")
    fig.colorbar(im, ax=ax, label="cosine similarity", shrink=0.8)
    return fig


def plot_prompt_norms(prompts: Mapping[str, torch.Tensor], vocab_embeddings: torch.Tensor) -> Figure:
    """Histogram of vocabulary L2 norms, with each task's virtual-token norms as a rug below it.

    prompts: {taskname: (V, D)}; vocab_embeddings: (N, D). A prompt far outside the vocabulary's norm
    range is a sign of a too-high learning rate or of a random init the model never learned to read.
    """
    vocab = _as_float_tensor(vocab_embeddings)
    checked = _check_prompts(prompts, hidden=vocab.shape[1])
    vocab_norms = vocab.norm(dim=1).numpy()
    colors = _task_colors(list(checked))

    fig = Figure(figsize=(8, 4.0 + 0.35 * len(checked)), layout="constrained")
    hist_ax, rug_ax = fig.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 0.6 + 0.3 * len(checked)]}
    )
    hist_ax.hist(vocab_norms, bins=50, color=VOCAB_COLOR, edgecolor="0.55",
                 label=f"vocabulary ({len(vocab_norms)} tokens)")
    for name, prompt in checked.items():
        norms = prompt.norm(dim=1)
        hist_ax.axvline(norms.mean().item(), color=colors[name], linestyle="--",
                        label=f"{name}: mean {norms.mean().item():.2f}")
    hist_ax.set_ylabel("vocabulary tokens")
    hist_ax.set_title("L2 norms of prompt vectors vs. vocabulary embeddings")
    hist_ax.legend(fontsize=8)

    # One rug row per task so tokens of different tasks never hide each other.
    for row, (name, prompt) in enumerate(checked.items()):
        norms = prompt.norm(dim=1).numpy()
        rug_ax.plot(norms, np.full_like(norms, row), "|", color=colors[name], markersize=14,
                    markeredgewidth=1.5)
    rug_ax.set_yticks(range(len(checked)), list(checked))
    rug_ax.set_ylim(len(checked) - 0.5, -0.5)
    rug_ax.set_xlabel("L2 norm")
    rug_ax.set_title("virtual tokens", fontsize=9, loc="left")
    return fig


def prefix_norms(prefix: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of a deep prompt's keys and values per layer: (L, 2, P, KV) -> (L, 2)."""
    prefix = _as_float_tensor(prefix)
    if prefix.dim() != 4 or prefix.shape[1] != 2:
        raise ValueError(f"a deep prompt is (layers, 2, P, width), got {tuple(prefix.shape)}")
    return prefix.norm(dim=-1).mean(dim=-1)


def plot_prefix_norms(prefixes: Mapping[str, torch.Tensor],
                      reference: Mapping[str, torch.Tensor] | None = None) -> Figure:
    """Per layer, the mean norm of each deep prompt's keys (left) and values (right).

    prefixes: {taskname: (L, 2, P, KV)}, e.g. ``{t: model.prefix(t)}``; reference: the same shape for
    comparison, drawn dashed (the model's own cache of its init text shows the scale it is used to).
    Layers where a prompt stands far above the reference are where it pushes the model hardest.
    """
    norms = {name: prefix_norms(p) for name, p in prefixes.items()}
    refs = {name: prefix_norms(p) for name, p in (reference or {}).items()}
    colors = _task_colors(list(norms) + [n for n in refs if n not in norms])
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for side, ax in enumerate(axes):
        for name, values in norms.items():
            ax.plot(range(len(values)), values[:, side].numpy(), "o-", color=colors[name], label=name)
        for name, values in refs.items():
            ax.plot(range(len(values)), values[:, side].numpy(), "--", color=colors[name], label=f"{name} (reference)")
        ax.set_xlabel("layer")
        ax.set_title(("keys", "values")[side])
    axes[0].set_ylabel("mean L2 norm per position")
    axes[0].legend(fontsize=8)
    fig.suptitle("Deep prompts: prefix norms per layer")
    return fig


# --------------------------------------------------------------------------------------------------
# metrics


def plot_metrics_comparison(
    results: Mapping[str, Mapping[str, float]], metric_names: Mapping[str, str] | None = None
) -> Figure:
    """Grouped bar chart: one group per task, one bar per method, bar height = the task's score.

    results: {method: {task: score}}, e.g. {"zero-shot": {"sentiment": 0.6}, "prompt tuning": {...}}.
    metric_names: optional {task: metric name} shown under each task. A method missing a task gets no
    bar. Scores are drawn as given: keep one scale (fractions or percentages) per task.
    """
    if not results:
        raise ValueError("no results to plot: pass {method: {task: score}}")
    methods = list(results)
    tasks = list(dict.fromkeys(task for scores in results.values() for task in scores))
    width = 0.8 / len(methods)
    positions = np.arange(len(tasks))

    # Wide enough for the value labels over each bar, but never wider than a notebook page.
    fig_width = min(14.0, max(6.0, 0.6 * len(tasks) * len(methods) + 2.5))
    fig = Figure(figsize=(fig_width, 4.5), layout="constrained")
    ax = fig.subplots()
    for m, method in enumerate(methods):
        heights = [results[method].get(task, math.nan) for task in tasks]
        offset = (m - (len(methods) - 1) / 2) * width
        bars = ax.bar(positions + offset, heights, width, label=method)
        ax.bar_label(bars, labels=["" if math.isnan(h) else f"{h:.3g}" for h in heights], fontsize=8,
                     padding=2)

    names = metric_names or {}
    ax.set_xticks(positions, [f"{t}\n({names[t]})" if t in names else t for t in tasks])
    ax.set_ylabel("score (higher is better)")
    ax.set_title("Methods compared per task")
    ax.margins(y=0.12)  # room for the value labels above the tallest bar
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_confusion_matrix(matrix, labels: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Heatmap of a confusion matrix (rows = reference label, columns = predicted), counts annotated.

    matrix: (L, L) nested list, numpy array or tensor, e.g. classification_metrics(...)["confusion_matrix"].
    """
    values = np.asarray(torch.as_tensor(matrix).cpu(), dtype=float)
    if values.ndim != 2 or values.shape != (len(labels), len(labels)):
        n = len(labels)
        raise ValueError(f"confusion matrix has shape {values.shape}; expected ({n}, {n})")
    size = 0.9 * len(labels) + 3.0
    fig = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(values, cmap="Blues", vmin=0)
    texts = [[f"{v:g}" for v in row] for row in values]
    _annotate_cells(ax, values, texts, im, fontsize=11)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="examples", shrink=0.8)
    return fig
