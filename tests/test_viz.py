"""Plots are built headless and hold the data they were given (and render to PNG)."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402

from promptlab import viz  # noqa: E402

D = 16


class FakeTokenizer:
    """Just enough of a Hugging Face tokenizer: token i is spelled "tok<i>"."""

    def convert_ids_to_tokens(self, ids):
        return [f"tok{i}" for i in ids]


class DecodeOnlyTokenizer:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture
def vocab():
    return torch.randn(300, D, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def prompts():
    g = torch.Generator().manual_seed(1)
    return {"sentiment": torch.randn(10, D, generator=g), "intent_and_slot": torch.randn(4, D, generator=g)}


def _render(fig: Figure, tmp_path, name: str) -> None:
    """Prove the figure draws: save it and check a non-trivial PNG came out."""
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def _visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def _images(fig):
    return [artist for ax in fig.axes for artist in ax.get_images() if isinstance(artist, AxesImage)]


# ------------------------------------------------------------------------------------------------
# training curves


def test_smooth_is_bias_corrected_ema():
    assert viz.smooth([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])  # constant stays constant
    # weight 0.5, t1: a = 0.5*0 + 0.5*2 = 1.0 -> 1.0/0.5 = 2.0; t2: a = 0.5*1 + 0.5*4 = 2.5 -> 2.5/0.75
    assert viz.smooth([2.0, 4.0], weight=0.5) == pytest.approx([2.0, 2.5 / 0.75])


def test_training_curves_panels_and_data(tmp_path):
    history = [{"step": s, "loss": 3.0 - 0.01 * s, "lr": 1e-3 * s / 100} for s in range(1, 101)]
    history += [
        {"step": 50, "val_loss": 2.5, "val/sentiment/accuracy": 0.7},
        {"step": 100, "val_loss": 2.2, "val/sentiment/accuracy": 0.8, "val/squad/f1": 0.4},
    ]
    fig = viz.plot_training_curves(history)
    axes = _visible_axes(fig)
    titles = [ax.get_title() for ax in axes]
    assert titles == ["Training loss", "Learning rate", "Validation loss", "Validation metrics"]
    assert all(ax.get_xlabel() == "step" for ax in axes)

    raw, smoothed = axes[0].get_lines()
    assert list(raw.get_ydata()) == pytest.approx([3.0 - 0.01 * s for s in range(1, 101)])
    assert list(smoothed.get_ydata()) == pytest.approx(viz.smooth(list(raw.get_ydata())))
    assert list(axes[1].get_lines()[0].get_ydata()) == pytest.approx([1e-5 * s for s in range(1, 101)])
    (val_loss,) = axes[2].get_lines()
    assert list(val_loss.get_xdata()) == [50, 100] and list(val_loss.get_ydata()) == [2.5, 2.2]
    metric_lines = {line.get_label(): line for line in axes[3].get_lines()}
    assert list(metric_lines["sentiment/accuracy"].get_ydata()) == [0.7, 0.8]
    assert list(metric_lines["squad/f1"].get_xdata()) == [100]
    _render(fig, tmp_path, "curves")


def test_training_curves_only_what_is_logged(tmp_path):
    fig = viz.plot_training_curves([{"loss": 1.0}, {"loss": 0.5}])  # no step: position is the step
    axes = _visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["Training loss"]
    assert list(axes[0].get_lines()[0].get_xdata()) == [1, 2]
    _render(fig, tmp_path, "curves_small")


def test_training_curves_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        viz.plot_training_curves([])
    with pytest.raises(ValueError, match="no 'loss'"):
        viz.plot_training_curves([{"epoch": 1}])


# ------------------------------------------------------------------------------------------------
# prompt embeddings


def test_pca_2d_recovers_a_line():
    direction = torch.nn.functional.normalize(torch.randn(D), dim=0)
    t = torch.linspace(-3, 3, 20)
    coords, mean, components, ratio = viz.pca_2d(t[:, None] * direction + 5.0)
    assert coords.shape == (20, 2)
    assert ratio[0] == pytest.approx(1.0, abs=1e-5)
    assert coords[:, 1].abs().max() < 1e-4  # nothing off the line
    # distances along the line are preserved (up to the fixed sign)
    assert (coords[:, 0] - coords[0, 0]).abs() == pytest.approx((t - t[0]).abs(), abs=1e-4)
    assert torch.allclose(mean, direction * t.mean() + 5.0, atol=1e-5)
    assert abs(torch.dot(components[0], direction).item()) == pytest.approx(1.0, abs=1e-5)


def test_prompt_pca_points_and_labels(prompts, vocab, tmp_path):
    fig = viz.plot_prompt_pca(prompts, vocab, sample=100, seed=3)
    ax = fig.axes[0]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert [len(c.get_offsets()) for c in scatters] == [100, 10, 4]
    labels = [t.get_text() for t in ax.texts]
    assert labels == [str(i) for i in range(10)] + [str(i) for i in range(4)]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "vocabulary (100 sampled)",
        "sentiment (10 virtual tokens)",
        "intent_and_slot (4 virtual tokens)",
    ]
    assert "PC1" in ax.get_xlabel() and "PC2" in ax.get_ylabel()
    # the annotations sit on the task's points
    assert ax.texts[0].xy == pytest.approx(tuple(scatters[1].get_offsets()[0]))
    _render(fig, tmp_path, "pca")


def test_prompt_pca_is_reproducible_and_caps_sample(prompts, vocab):
    a = viz.plot_prompt_pca(prompts, vocab, sample=5000, seed=0).axes[0].collections
    b = viz.plot_prompt_pca(prompts, vocab, sample=5000, seed=0).axes[0].collections
    assert len(a[0].get_offsets()) == 300  # capped at the vocabulary size
    assert np.allclose(a[1].get_offsets(), b[1].get_offsets())


def test_prompt_pca_checks_hidden_size(vocab):
    with pytest.raises(ValueError, match="hidden size 8"):
        viz.plot_prompt_pca({"t": torch.randn(3, 8)}, vocab)
    with pytest.raises(ValueError, match="no prompts"):
        viz.plot_prompt_pca({}, vocab)


def test_nearest_tokens_finds_planted_neighbours(vocab):
    prompt = torch.stack([vocab[7] * 2.0, vocab[42] + 1e-3])  # (2, D): scaled copies: cosine 1
    result = viz.nearest_tokens(prompt, vocab, FakeTokenizer(), k=3)
    assert len(result) == 2 and all(len(row) == 3 for row in result)
    assert result[0][0][0] == "tok7" and result[0][0][1] == pytest.approx(1.0, abs=1e-5)
    assert result[1][0][0] == "tok42"
    # best first, and the values are real cosine similarities
    sims = torch.nn.functional.cosine_similarity(prompt[0][None], vocab)
    expected = sims.topk(3)
    assert [s for _, s in result[0]] == pytest.approx(expected.values.tolist(), abs=1e-5)
    assert [t for t, _ in result[0]] == [f"tok{i}" for i in expected.indices.tolist()]


def test_nearest_tokens_decode_fallback_and_k_cap():
    vocab = torch.eye(3)
    result = viz.nearest_tokens(torch.tensor([[0.0, 1.0, 0.0]]), vocab, DecodeOnlyTokenizer(), k=10)
    assert [t for t, _ in result[0]][0] == "<1>"
    assert len(result[0]) == 3


def test_plot_nearest_tokens_heatmap_and_annotations(prompts, vocab, tmp_path):
    prompt = prompts["intent_and_slot"]
    fig = viz.plot_nearest_tokens(prompt, vocab, FakeTokenizer(), k=4, title="intent prompt")
    expected = viz.nearest_tokens(prompt, vocab, FakeTokenizer(), k=4)
    (image,) = _images(fig)
    assert np.allclose(image.get_array(), [[s for _, s in row] for row in expected])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == [tok for row in expected for tok, _ in row]
    assert ax.get_title() == "intent prompt"
    _render(fig, tmp_path, "nearest")


def test_plot_nearest_tokens_draws_awkward_tokens_literally(tmp_path):
    class Awkward:
        def convert_ids_to_tokens(self, ids):
            return ["$x$", "\n", " ", "averyveryverylongtoken"][: len(ids)] if ids else []

    vocab = torch.eye(4)
    fig = viz.plot_nearest_tokens(torch.ones(1, 4), vocab, Awkward(), k=4)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[:3] == ["$x$", "\\n", "' '"]
    assert texts[3].endswith("…") and len(texts[3]) == 14
    _render(fig, tmp_path, "awkward")  # "$x$" would fail as mathtext if it were parsed


def test_task_similarity_matches_cosine_of_means(prompts, tmp_path):
    names, matrix = viz.task_similarity(prompts)
    assert names == ["sentiment", "intent_and_slot"]
    means = [prompts[n].mean(0) for n in names]
    expected = torch.nn.functional.cosine_similarity(means[0], means[1], dim=0)
    assert matrix.shape == (2, 2)
    assert matrix[0, 1].item() == pytest.approx(expected.item(), abs=1e-5)
    assert torch.allclose(matrix, matrix.T) and torch.allclose(matrix.diag(), torch.ones(2), atol=1e-5)

    fig = viz.plot_task_similarity(prompts)
    (image,) = _images(fig)
    assert np.allclose(image.get_array(), matrix.numpy())
    assert [t.get_text() for t in fig.axes[0].texts] == [f"{v:.2f}" for v in matrix.flatten().tolist()]
    _render(fig, tmp_path, "similarity")


def test_task_similarity_rejects_mixed_widths():
    with pytest.raises(ValueError, match="hidden sizes"):
        viz.task_similarity({"a": torch.randn(2, 4), "b": torch.randn(2, 5)})


def test_prompt_norms_histogram_and_rug(prompts, vocab, tmp_path):
    fig = viz.plot_prompt_norms(prompts, vocab)
    hist_ax, rug_ax = fig.axes
    assert sum(patch.get_height() for patch in hist_ax.patches) == 300  # every vocabulary token
    rugs = rug_ax.get_lines()
    assert len(rugs) == 2
    assert np.allclose(rugs[0].get_xdata(), prompts["sentiment"].norm(dim=1).numpy())
    assert np.allclose(rugs[1].get_xdata(), prompts["intent_and_slot"].norm(dim=1).numpy())
    assert [t.get_text() for t in rug_ax.get_yticklabels()] == ["sentiment", "intent_and_slot"]
    legend = [t.get_text() for t in hist_ax.get_legend().get_texts()]
    assert legend[0] == "vocabulary (300 tokens)" and legend[1].startswith("sentiment: mean")
    _render(fig, tmp_path, "norms")


# ------------------------------------------------------------------------------------------------
# metrics


def test_metrics_comparison_bars(tmp_path):
    results = {
        "zero-shot": {"sentiment": 0.6, "intent_and_slot": 0.1},
        "prompt tuning": {"sentiment": 0.9},  # no intent result: no bar
    }
    fig = viz.plot_metrics_comparison(results, {"sentiment": "accuracy"})
    ax = fig.axes[0]
    heights = [[bar.get_height() for bar in container] for container in ax.containers]
    assert heights[0] == [0.6, 0.1]
    assert heights[1][0] == 0.9 and np.isnan(heights[1][1])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sentiment\n(accuracy)", "intent_and_slot"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["zero-shot", "prompt tuning"]
    assert {t.get_text() for t in ax.texts} >= {"0.6", "0.1", "0.9"}
    _render(fig, tmp_path, "comparison")


def test_confusion_matrix_plot(tmp_path):
    matrix = [[5, 1, 0], [2, 3, 0], [0, 0, 7]]
    fig = viz.plot_confusion_matrix(matrix, ["negative", "neutral", "positive"])
    (image,) = _images(fig)
    assert np.array_equal(image.get_array(), np.array(matrix, dtype=float))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["5", "1", "0", "2", "3", "0", "0", "0", "7"]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "reference"
    _render(fig, tmp_path, "confusion")
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        viz.plot_confusion_matrix(matrix, ["a", "b"])


def test_figures_are_not_registered_with_pyplot(prompts, vocab):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    viz.plot_task_similarity(prompts)
    assert plt.get_fignums() == before  # nothing for plt.show() to pop up or leak
