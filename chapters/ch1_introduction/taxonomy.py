"""The delta-tuning taxonomy: every method of the course placed in one of three families.

Paper: "Parameter-efficient fine-tuning of large-scale pre-trained language models" (Ding et al., Nature
Machine Intelligence 2023; arXiv 2203.06904). Fine-tuning changes the pretrained theta0 into theta0 + Delta;
the methods differ in how Delta is defined:

    addition            Delta lives in new parameters (prompts, prefixes, adapters, scaling vectors)
    specification       Delta is a masked update of existing parameters: theta = theta0 + M * Delta
    reparameterisation  Delta (or its update) is written through a low-dimensional form: Delta W = B A, ...

`TAXONOMY` is the data (family -> methods, in course order), `family_of` looks a method up, and
`draw_taxonomy` returns a matplotlib Figure (Agg backend, so it works without a display).

Choices made here, where a method does not fit one box cleanly (the `NOTES`): proxy-tuning adds a tuned
small model's logit offset at decoding time (addition, of a whole external module); (IA)^3's scaling
vectors are new parameters (addition); HiWi trains an adapter applied to the weights and merges it
(reparameterisation); GaLore and SLTrain reparameterise the gradient / the weight as low-rank (plus
sparse) (reparameterisation); the lottery ticket hypothesis is pruning, not PEFT, but its mask-then-rewind
recipe is the ancestor of LT-SFT (specification). Papers that are analyses, surveys, serving systems or
applications (a unified view of PETL, A Note on LoRA, LoRA Learns Less and Forgets Less, S-LoRA, FinSQL,
TabLLM, the LoRA survey) and the chapter-1 baselines (in-context learning, full fine-tuning) are not
delta-tuning methods and are not placed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FAMILIES = ("addition", "specification", "reparameterisation")

TAXONOMY: dict[str, tuple[str, ...]] = {
    "addition": (
        "Prompt tuning", "Prefix tuning", "Houlsby adapter", "AdapterFusion", "SparseAdapter", "CIAT",
        "Proxy-tuning", "Parallel adapter / MAM", "(IA)^3",
    ),
    "specification": (
        "BitFit", "Layer freezing", "SAM", "PaFi", "FISH mask", "Child-Tuning", "Masking", "LT-SFT",
        "Lottery ticket", "FISH-DIP", "LISA",
    ),
    "reparameterisation": (
        "HiWi", "LoRA", "rsLoRA", "KronA", "KAdaptation", "DoRA", "PiSSA", "MiLoRA", "LoTR", "MoRA", "MELoRA",
        "Intrinsic dimension", "AdaLoRA", "SoRA", "DoRA (dynamic rank)", "DyLoRA", "ReLoRA", "COLA", "GaLore",
        "SLTrain", "LoraHub", "QLoRA", "LoRA+", "VeRA", "LoHa",
    ),
}

_CH2, _CH3, _CH4 = "chapters/ch2_additive/", "chapters/ch3_selective/", "chapters/ch4_low_rank/"
FILES: dict[str, str] = {  # method -> the file that implements it (paths from the repository root)
    "Prompt tuning": _CH2 + "prompt_tuning.py", "Prefix tuning": _CH2 + "prefix_tuning.py",
    "Houlsby adapter": _CH2 + "adapters.py", "AdapterFusion": _CH2 + "adapter_fusion.py",
    "SparseAdapter": _CH2 + "sparse_adapter.py", "CIAT": _CH2 + "ciat.py", "Proxy-tuning": _CH2 + "proxy_tuning.py",
    "Parallel adapter / MAM": _CH4 + "unified_view.py", "(IA)^3": _CH2 + "ia3.py",
    "BitFit": _CH3 + "bitfit.py", "Layer freezing": _CH3 + "freeze_layers.py", "SAM": _CH3 + "sam.py",
    "PaFi": _CH3 + "pafi_hiwi.py", "FISH mask": _CH2 + "fish_mask.py", "Child-Tuning": _CH3 + "child_tuning.py",
    "Masking": _CH3 + "learned_masks.py", "LT-SFT": _CH3 + "lt_sft.py", "Lottery ticket": _CH3 + "lottery_ticket.py",
    "FISH-DIP": _CH3 + "fish_dip.py", "LISA": _CH4 + "lisa.py",
    "HiWi": _CH3 + "pafi_hiwi.py", "LoRA": _CH4 + "lora.py", "rsLoRA": _CH4 + "lora.py", "KronA": _CH4 + "krona.py",
    "KAdaptation": _CH4 + "krona.py", "DoRA": _CH4 + "dora.py", "PiSSA": _CH4 + "pissa.py",
    "MiLoRA": _CH4 + "pissa.py", "LoTR": _CH4 + "lotr.py", "MoRA": _CH4 + "mora.py", "MELoRA": _CH4 + "melora.py",
    "Intrinsic dimension": _CH4 + "intrinsic_dimension.py", "AdaLoRA": _CH4 + "adalora.py", "SoRA": _CH4 + "sora.py",
    "DoRA (dynamic rank)": _CH4 + "dyna_dora.py", "DyLoRA": _CH4 + "dylora.py", "ReLoRA": _CH4 + "relora.py",
    "COLA": _CH4 + "chain_of_lora.py", "GaLore": _CH4 + "galore.py", "SLTrain": _CH4 + "sltrain.py",
    "LoraHub": _CH4 + "lorahub.py", "QLoRA": _CH4 + "qlora.py", "LoRA+": _CH4 + "lora_plus.py",
    "VeRA": _CH4 + "vera.py", "LoHa": _CH4 + "loha.py",
}

NOTES: dict[str, str] = {
    "Proxy-tuning": "adds a small tuned model's logit offset at decoding time",
    "(IA)^3": "learned vectors rescale activations",
    "HiWi": "an adapter on the weights, merged after training",
    "Lottery ticket": "pruning, not PEFT; the ancestor of LT-SFT",
    "GaLore": "low-rank projection of the gradient, not of the weight",
    "SLTrain": "W = B A + S for pretraining",
    "QLoRA": "LoRA's delta on a base stored in 4-bit NF4 (the quantisation itself is not a delta)",
    "LoraHub": "a weighted sum of trained LoRA modules",
}


def family_of(method: str) -> str:
    """The family of a method (case-insensitive name); ValueError naming the known methods otherwise."""
    for family, methods in TAXONOMY.items():
        if method.lower() in (m.lower() for m in methods):
            return family
    known = [m for methods in TAXONOMY.values() for m in methods]
    raise ValueError(f"method {method!r} is not in the taxonomy; known: {known}")


def draw_taxonomy(taxonomy: dict[str, tuple[str, ...]] | None = None) -> Figure:
    """A tree: 'delta tuning' on top, one box per family, its methods listed below. Returns the Figure.

    The figure is drawn on its own Agg canvas, without pyplot, so it changes no global backend; a notebook
    displays the returned Figure, a script saves it with `fig.savefig(path)`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    taxonomy = taxonomy or TAXONOMY
    n = len(taxonomy)
    tallest = max(len(m) for m in taxonomy.values())
    fig = Figure(figsize=(3.4 * n, 2.2 + 0.3 * tallest))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_xlim(0, n)
    ax.set_ylim(-0.8 * tallest - 0.4, 2.6)
    box = {"boxstyle": "round,pad=0.4", "linewidth": 1.0}
    ax.text(n / 2, 2.0, "delta tuning: theta = theta0 + Delta", ha="center", va="center", fontsize=12,
            bbox={**box, "facecolor": "#eeeeee"})
    colors = ["#cfe2f3", "#d9ead3", "#fce5cd", "#ead1dc"]
    for i, (family, methods) in enumerate(taxonomy.items()):
        x = i + 0.5
        ax.annotate("", xy=(x, 0.9), xytext=(n / 2, 1.6), arrowprops={"arrowstyle": "->", "color": "gray"})
        ax.text(x, 0.5, f"{family} ({len(methods)})", ha="center", va="center", fontsize=11, fontweight="bold",
                bbox={**box, "facecolor": colors[i % len(colors)]})
        for j, method in enumerate(methods):
            label = method + ("*" if method in NOTES else "")
            ax.text(x, -0.5 - j * 0.8, label, ha="center", va="center", fontsize=9)
    if any(m in NOTES for methods in taxonomy.values() for m in methods):
        ax.text(0.02, -0.8 * tallest - 0.2, "* placement is a judgement call: see taxonomy.NOTES", fontsize=8,
                color="gray")
    ax.set_title("The delta-tuning taxonomy (Ding et al. 2023) of the methods in this course")
    fig.tight_layout()
    return fig
