"""Draw the diagrams the notebooks show into ``images/`` (matplotlib only; no model, no data, no network).

How to run: ``python scripts/make_images.py`` (from anywhere; ``--out DIR`` writes elsewhere).

* ``prompt_learning_forward_pass.png``: how virtual tokens enter the frozen model's forward pass;
* ``prompt_vs_p_tuning.png``: what is trained and what is stored, for each method;
* ``mixed_batch.png``: one left-padded generation batch that mixes tasks of both methods.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# One colour per role, the same in every figure.
FROZEN = "#d9d9d9"  # frozen weights and real-token embeddings
FROZEN_EDGE = "#7f7f7f"
PROMPT = "#f4a340"  # learned prompt vectors (trainable)
PROMPT_EDGE = "#b35c00"
ENCODER = "#9ecae1"  # the p-tuning encoder (trainable, dropped after training)
ENCODER_EDGE = "#2b6a99"
ANSWER = "#a1d99b"  # answer tokens: the only ones with a loss
ANSWER_EDGE = "#2f7d32"
PAD = "white"
GRAD = "#c0392b"  # gradient flow
TEXT = "#222222"
TASK_COLORS = {"sentiment": PROMPT, "intent_and_slot": "#c994c7", "squad": "#6baed6"}
TASK_EDGES = {"sentiment": PROMPT_EDGE, "intent_and_slot": "#7a3b77", "squad": "#2b6a99"}


# ------------------------------------------------------------------------------------------- helpers
def canvas(width: float, height: float, xmax: float, ymax: float):
    """A figure with one axis-less panel whose data units run 0..xmax, 0..ymax (1 unit ~ same in x and y)."""
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, ymax)
    ax.axis("off")
    return fig, ax


def box(ax, x, y, w, h, text="", face=FROZEN, edge=FROZEN_EDGE, size=10, weight="normal", style="round,pad=0.02",
        lw=1.2, color=TEXT, ls="-"):
    """A rounded box with centred text; (x, y) is the lower-left corner."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=face, edgecolor=edge, linewidth=lw,
                                linestyle=ls))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight, color=color,
                linespacing=1.3)


def arrow(ax, start, end, color=TEXT, lw=1.4, style="-|>", ls="-", rad=0.0, mut=14):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, color=color, linewidth=lw, linestyle=ls,
                                 mutation_scale=mut, connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))


def cell(ax, x, y, w, h, text, face, edge, size=9, color=TEXT, weight="normal"):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=face, edgecolor=edge, linewidth=1.0))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, color=color, weight=weight)


def step_label(ax, x, y, n, text):
    """A numbered step in the left margin."""
    ax.text(x, y, f"{n}", ha="center", va="center", fontsize=11, weight="bold", color="white",
            bbox=dict(boxstyle="circle,pad=0.25", facecolor="#444444", edgecolor="none"))
    ax.text(x + 0.45, y, text, ha="left", va="center", fontsize=10.5, weight="bold", color=TEXT)


def lock(ax, x, y, size=9):
    ax.text(x, y, "frozen", ha="center", va="center", fontsize=size, style="italic", color="#555555",
            bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor=FROZEN_EDGE, linewidth=0.8))


def trainable(ax, x, y, size=9, edge=PROMPT_EDGE):
    ax.text(x, y, "trainable", ha="center", va="center", fontsize=size, style="italic", color=edge,
            bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor=edge, linewidth=0.8))


# ------------------------------------------------------------------------------- 1. the forward pass
# The running example: sentiment's template with 3 of its 10 virtual tokens drawn. The ids are the real
# ones of the SmolLM2 tokenizer (`promptlab.data.features.encode` of this record).
POSITIONS = [  # (shown text, kind, input id) with kind in virtual | text | answer
    ("[V0]", "virtual", "pad"), ("[V1]", "virtual", "pad"), ("[V2]", "virtual", "pad"),
    (" Sales", "text", "25975"), (" rose", "text", "8739"), (" sentiment", "text", "19025"), (":", "text", "42"),
    (" positive", "answer", "2731"), ("<eos>", "answer", "2"),
]


def forward_pass() -> Figure:
    n = len(POSITIONS)
    cw, gap, x0 = 1.2, 0.14, 4.4  # cell width, gap, x of the first position
    xs = [x0 + i * (cw + gap) for i in range(n)]
    centre = [x + cw / 2 for x in xs]
    right = xs[-1] + cw
    fig, ax = canvas(15, 16.5, 19.0, 20.9)
    ax.text(9.5, 20.4, "How virtual tokens enter the frozen model's forward pass (training)", ha="center",
            fontsize=16, weight="bold")

    # 1. template + record
    step_label(ax, 0.45, 19.45, 1, "template + record")
    box(ax, x0, 18.9, right - x0, 1.1,
        'template  "<|VIRTUAL_PROMPT_0|> {sentence} sentiment: {label}"\n'
        'record     {"sentence": "Sales rose", "label": "positive"}',
        face="#f7f7f7", size=11)
    arrow(ax, ((x0 + right) / 2, 18.85), ((x0 + right) / 2, 18.05))
    ax.text((x0 + right) / 2 + 0.15, 18.45, "tokenize each segment; the marker becomes V positions "
            "(no new vocabulary)", fontsize=10, va="center", color="#555555")

    # 2. positions: token ids, virtual_index, labels
    step_label(ax, 0.45, 17.55, 2, "positions")
    y_tok = 17.25
    for x, (text, kind, _) in zip(xs, POSITIONS):
        face, edge = {"virtual": (PROMPT, PROMPT_EDGE), "text": (FROZEN, FROZEN_EDGE),
                      "answer": (ANSWER, ANSWER_EDGE)}[kind]
        cell(ax, x, y_tok, cw, 0.65, text, face, edge, size=10.5, weight="bold" if kind != "text" else "normal")
    ax.text(right + 0.2, y_tok + 0.33, "sentiment has\n10 virtual tokens;\n3 are drawn", fontsize=9,
            va="center", color="#555555")
    rows = [("input_ids", [p[2] for p in POSITIONS]),
            ("virtual_index", ["0", "1", "2"] + ["-1"] * (n - 3)),
            ("labels", ["-100"] * (n - 2) + ["2731", "2"])]
    for r, (name, values) in enumerate(rows):
        y = 16.75 - 0.45 * r
        ax.text(x0 - 0.2, y, name, ha="right", va="center", fontsize=10, family="monospace")
        for x, v, (_, kind, _) in zip(xs, values, POSITIONS):
            hot = (name == "virtual_index" and kind == "virtual") or (name == "labels" and kind == "answer")
            ax.text(x + cw / 2, y, v, ha="center", va="center", fontsize=10, family="monospace",
                    color=PROMPT_EDGE if hot and kind == "virtual" else ANSWER_EDGE if hot else "#555555",
                    weight="bold" if hot else "normal")
    ax.text(right + 0.2, 16.3, "-100: no loss\n(answer-only\nloss)", fontsize=9, va="center", color="#555555")

    # 3. two lookups
    step_label(ax, 0.45, 14.45, 3, "embed")
    pr_x, pr_w = x0, xs[2] + cw - x0
    emb_x, emb_w = xs[3], right - xs[3]
    box(ax, pr_x, 13.0, pr_w, 1.45, "trainable task prompt (V x D)\nprompt tuning: the matrix\n"
        "p-tuning: encoder(inputs)", face=PROMPT, edge=PROMPT_EDGE, size=10)
    box(ax, emb_x, 13.0, emb_w, 1.45, "frozen embedding table (vocab 49,152 x D)\n"
        "real tokens: look up their input_ids", size=10.5)
    for c, (_, kind, _) in zip(centre, POSITIONS):
        color = PROMPT_EDGE if kind == "virtual" else FROZEN_EDGE
        arrow(ax, (c, 15.7), (c, 14.5), color=color)
        arrow(ax, (c, 12.95), (c, 11.9), color=color, lw=1.0, mut=10)
    ax.text(right + 0.2, 13.7, "D = hidden size\n(576 for\nSmolLM2-135M)", fontsize=9, va="center",
            color="#555555")

    # 4. combined inputs_embeds
    step_label(ax, 0.45, 11.5, 4, "inputs_embeds")
    y_emb = 11.05
    for x, (_, kind, _) in zip(xs, POSITIONS):
        face, edge = (PROMPT, PROMPT_EDGE) if kind == "virtual" else (FROZEN, FROZEN_EDGE)
        for k in range(5):  # a little column of vector entries
            ax.add_patch(Rectangle((x + 0.2, y_emb - 0.16 * k), cw - 0.4, 0.16, facecolor=face, edgecolor=edge,
                                   linewidth=0.6))
    ax.text(right + 0.2, 10.85, "(B, T, D): prompt\nrows written into\nthe virtual positions", fontsize=9,
            va="center", color="#555555")

    # 5. frozen transformer
    step_label(ax, 0.45, 9.05, 5, "transformer")
    box(ax, x0, 8.3, right - x0, 1.4, "frozen transformer: every layer attends over prompt + text\n"
        "(position ids from the attention mask: padding never shifts a prompt)", size=10.5)
    lock(ax, right - 0.55, 9.45)
    for c in centre:
        arrow(ax, (c, 10.35), (c, 9.75), color=FROZEN_EDGE, lw=0.9, mut=9)

    # 6. hidden states, LM head only where a label follows
    step_label(ax, 0.45, 7.0, 6, "LM head")
    y_h = 6.75
    for i, (x, c) in enumerate(zip(xs, centre)):
        arrow(ax, (c, 8.25), (c, y_h + 0.5), color=FROZEN_EDGE, lw=0.9, mut=9)
        used = i + 1 < n and POSITIONS[i + 1][1] == "answer"  # position t predicts token t+1
        cell(ax, x + 0.2, y_h, cw - 0.4, 0.45, "h", FROZEN if used else "white", FROZEN_EDGE, size=9,
             color=TEXT if used else "#aaaaaa")
        if used:
            target = POSITIONS[i + 1][0].strip()
            box(ax, x + 0.02, 5.2, cw - 0.04, 0.95, f"LM head\nnext:\n{target}", face=ANSWER, edge=ANSWER_EDGE,
                size=8.5)
            arrow(ax, (c, y_h - 0.03), (c, 6.2), color=ANSWER_EDGE, lw=1.1, mut=10)
    ax.text((xs[0] + xs[5] + cw) / 2, 5.65, "position t predicts token t+1; the (vocab-wide) LM head runs\n"
            "only at the positions whose next token is an answer token", ha="center", va="center",
            fontsize=10, color="#555555")

    # 7. loss and the gradient path back to the prompt
    step_label(ax, 0.45, 3.6, 7, "loss")
    lx = xs[6]
    box(ax, lx, 3.05, right - lx, 1.15, "cross-entropy with labels\n(answer tokens only)", face=ANSWER,
        edge=ANSWER_EDGE, size=10)
    for i in (6, 7):
        arrow(ax, (centre[i], 5.15), (centre[i], 4.25), color=ANSWER_EDGE, lw=1.1, mut=10)
    gx = x0 - 0.55  # the gradient runs up the left margin, clear of the data flow
    ax.plot([lx - 0.05, gx, gx], [3.4, 3.4, 12.9], color=GRAD, linewidth=2.2, linestyle="--")
    arrow(ax, (gx, 12.6), (pr_x - 0.05, 13.45), color=GRAD, lw=2.2, mut=18)
    ax.text(x0 + 0.1, 2.45, "backward: gradients pass through the frozen layers (which never change) "
            "and update only the prompt (or the p-tuning encoder)", ha="left", va="center", fontsize=10,
            color=GRAD, weight="bold")

    # legend
    items = [(PROMPT, PROMPT_EDGE, "virtual position / learned prompt (trainable)"),
             (FROZEN, FROZEN_EDGE, "real token / frozen weights"),
             (ANSWER, ANSWER_EDGE, "answer tokens: the only positions with a loss")]
    for k, (face, edge, text) in enumerate(items):
        x = 0.6 + k * 6.2
        ax.add_patch(Rectangle((x, 0.75), 0.5, 0.4, facecolor=face, edgecolor=edge))
        ax.text(x + 0.65, 0.95, text, va="center", fontsize=10)
    return fig


# ------------------------------------------------------------------------ 2. prompt vs p-tuning
def encoder_parameters(dim: int = 576, virtual: int = 10) -> tuple[int, int]:
    """(shared encoder parameters, per-task input parameters) of the default LSTM encoder, from the code."""
    try:
        import torch

        from promptlab.prompts import EncoderConfig, PromptEncoder
    except ImportError:  # drawing must not need the library: the numbers of the defaults, counted once
        return 3_564_352, dim * virtual
    enc = PromptEncoder({"task": torch.zeros(virtual, dim)}, dim, EncoderConfig())
    own = enc.inputs["task"].numel()
    return sum(p.numel() for p in enc.parameters()) - own, own


def _grid(ax, x, y, rows, cols, w, h, face, edge):
    """A small (rows x cols) matrix drawing; returns its bounding box."""
    for r in range(rows):
        for c in range(cols):
            ax.add_patch(Rectangle((x + c * w, y + r * h), w, h, facecolor=face, edgecolor=edge, linewidth=0.6))
    return x, y, cols * w, rows * h


def prompt_vs_p_tuning() -> Figure:
    shared, own = encoder_parameters()
    fig, ax = canvas(15, 8.0, 17.5, 9.35)
    ax.text(8.75, 9.0, "Prompt tuning vs. p-tuning: what is trained, what is kept", ha="center", fontsize=15,
            weight="bold")
    for x0, title in ((0.3, "Prompt tuning"), (9.0, "P-tuning")):
        box(ax, x0, 0.75, 8.2, 7.85, face="#fbfbfb", edge="#bbbbbb", style="round,pad=0.05")
        ax.text(x0 + 4.1, 8.2, title, ha="center", fontsize=13.5, weight="bold")
        box(ax, x0 + 0.5, 4.3, 7.2, 1.0, "frozen LM: the virtual positions read the prompt's V rows", size=10.5)
        lock(ax, x0 + 7.1, 5.05, size=8.5)

    # left: the prompt is the parameter
    _grid(ax, 2.8, 6.0, 4, 10, 0.3, 0.3, PROMPT, PROMPT_EDGE)
    ax.text(4.3, 7.55, "prompt P (V x D): the parameter itself", ha="center", fontsize=10)
    trainable(ax, 6.45, 6.6)
    arrow(ax, (4.3, 5.95), (4.3, 5.35), color=PROMPT_EDGE, lw=1.8)
    ax.text(0.9, 3.55, "init: text (embeddings of a phrase, tiled), sampled\nvocabulary rows, or random",
            fontsize=10, va="center")
    ax.text(0.9, 2.45, f"trained per task: V x D = {own:,} numbers\n(V = 10 virtual tokens, D = 576)",
            fontsize=10.5, va="center", weight="bold", color=PROMPT_EDGE)
    ax.text(0.9, 1.35, f"stored after training: the same {own:,} numbers,\none entry of the prompt table",
            fontsize=10.5, va="center")

    # right: an encoder reparameterises the prompt
    _grid(ax, 9.45, 6.15, 3, 10, 0.2, 0.3, "#eeeeee", "#999999")
    ax.text(10.45, 7.35, "task inputs (V x D)", ha="center", fontsize=10)
    box(ax, 12.0, 5.95, 2.45, 1.3, "shared encoder\nbi-LSTM -> MLP\n(+ residual)", face=ENCODER,
        edge=ENCODER_EDGE, size=10)
    trainable(ax, 13.22, 7.55, edge=ENCODER_EDGE)
    _grid(ax, 14.95, 6.15, 3, 10, 0.19, 0.3, PROMPT, PROMPT_EDGE)
    ax.text(15.9, 7.35, "prompt (V x D)", ha="center", fontsize=10)
    arrow(ax, (11.5, 6.6), (11.95, 6.6), color=ENCODER_EDGE, lw=1.8, mut=12)
    arrow(ax, (14.5, 6.6), (14.95, 6.6), color=ENCODER_EDGE, lw=1.8, mut=12)
    arrow(ax, (15.9, 6.1), (15.9, 5.35), color=PROMPT_EDGE, lw=1.8)
    ax.text(9.6, 3.55, "one encoder is shared by the tasks trained together;\n"
            "each task has its own inputs, hence its own prompt", fontsize=10, va="center")
    ax.text(9.6, 2.45, f"trained: {shared:,} encoder parameters (shared)\n+ {own:,} inputs per task",
            fontsize=10.5, va="center", weight="bold", color=ENCODER_EDGE)
    ax.text(9.6, 1.35, f"stored after training: the encoder's output only,\n{own:,} per task; "
            "model.freeze() drops the encoder", fontsize=10.5, va="center")

    ax.text(8.75, 0.3, "Both end as the same thing: a frozen (V x D) tensor per task in one prompt table, "
            "read the same way at inference.", ha="center", fontsize=10.5, style="italic")
    return fig


# ------------------------------------------------------------------------------ 3. a mixed batch
MIXED_ROWS = [  # task, method, layout of the prompt part: ("v", n) virtual run or ("t", text tokens)
    ("sentiment", "prompt tuning, 10 virtual", [("v", 10), ("t", ["Sales", " fell", " .", " sentiment", ":"])]),
    ("intent_and_slot", "p-tuning, 10 virtual split [7, 3]",
     [("v", 7), ("t", [" Predict", " intent", " and", " slot"]), ("v", 3), ("t", [" :", "\\n", "wake", " me", "\\n"])]),
    ("squad", "p-tuning, 15 virtual", [("v", 15), ("t", [" Context", ":", " ...", "\\n\\n", "Question", ":", " ...",
                                                           "\\n\\n", "Answer", ":"])]),
]


def mixed_batch() -> Figure:
    rows = []
    for task, method, parts in MIXED_ROWS:
        cells, v = [], 0
        for kind, value in parts:
            if kind == "v":
                cells += [("v", f"V{v + i}") for i in range(value)]
                v += value
            else:
                cells += [("t", t) for t in value]
        rows.append((task, method, cells))
    width = max(len(c) for _, _, c in rows)
    cw, ch, x0 = 0.5, 0.62, 3.6
    fig, ax = canvas(15, 5.3, x0 + width * cw + 1.9, 6.25)
    ax.text((x0 + width * cw) / 2 + 1.0, 5.85, "One generation batch, three tasks, both methods (left padding)",
            ha="center", fontsize=14, weight="bold")
    for r, (task, method, cells) in enumerate(rows):
        y = 4.35 - r * 1.3
        ax.text(x0 - 0.15, y + ch * 0.68, task, ha="right", va="center", fontsize=10.5, weight="bold")
        ax.text(x0 - 0.15, y + ch * 0.22, method, ha="right", va="center", fontsize=8.5, color="#555555")
        pad = width - len(cells)
        for k in range(pad):
            cell(ax, x0 + k * cw, y, cw, ch, "", PAD, "#cccccc")
        for k, (kind, text) in enumerate(cells):
            x = x0 + (pad + k) * cw
            if kind == "v":
                cell(ax, x, y, cw, ch, text, TASK_COLORS[task], TASK_EDGES[task], size=6.5)
            else:
                cell(ax, x, y, cw, ch, text, FROZEN, FROZEN_EDGE, size=6.5)
        if r == 0:  # position ids count real positions only: the padding does not move the prompt
            ax.text(x0 - 0.15, y - 0.22, "position ids", ha="right", va="center", fontsize=8, color="#555555",
                    family="monospace")
            for k in range(width):
                ax.text(x0 + (k + 0.5) * cw, y - 0.22, "0" if k < pad else str(k - pad), ha="center",
                        va="center", fontsize=7, color="#aaaaaa" if k < pad else "#555555", family="monospace")
        end = x0 + width * cw
        arrow(ax, (end + 0.05, y + ch / 2), (end + 0.75, y + ch / 2), color=ANSWER_EDGE, lw=1.6)
        ax.text(end + 0.85, y + ch / 2, "next\ntoken", fontsize=8, va="center", color=ANSWER_EDGE)
    notes = ("White: left padding (attention mask 0; position ids count real positions only, so padding never "
             "shifts a prompt).\nColoured: each row's virtual positions, filled from its own task's prompt: "
             "stack (K tasks, Vmax, D)[task of the row, virtual_index].\nGrey: real tokens from the frozen "
             "embedding table.  Greedy decoding gives each row exactly the text it would get alone.")
    ax.text(0.3, 0.5, notes, fontsize=9, va="center", color="#333333", linespacing=1.5)
    return fig


FIGURES = {"prompt_learning_forward_pass.png": forward_pass, "prompt_vs_p_tuning.png": prompt_vs_p_tuning,
           "mixed_batch.png": mixed_batch}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "images"), help="folder for the PNG files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in FIGURES.items():
        draw().savefig(out / name, dpi=110, facecolor="white")
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
