"""The methods the forgetting experiment compares, and how each is staged.

Learning rates live on a half-decade grid, ``lr = 10 ** (e / 2)`` for an integer
exponent ``e`` (…, 1e-3, 3.2e-3, 1e-2, 3.2e-2, …), so a grid is log-spaced by
construction and extending it by one step either way is exact.
"""

from __future__ import annotations

from dataclasses import dataclass


#: The half-decade exponents a learning rate may take: 1e-20 ... 1.
MIN_EXPONENT = -40
MAX_EXPONENT = 0


def lr_of(e: int) -> float:
    """The learning rate of half-decade exponent ``e``: ``10 ** (e / 2)``."""
    return 10.0 ** (e / 2)


def lr_label(e: int) -> str:
    """Short label: ``-4`` -> ``1e-02``, ``-5`` -> ``3.2e-03``."""
    lr = lr_of(e)
    return f"{lr:.0e}" if e % 2 == 0 else f"{lr:.1e}"


@dataclass(frozen=True)
class Method:
    """One compared method.

    Attributes:
        id: the name used on the command line and in results.
        family: ``gain`` (gain files, stacked), ``peft`` (an adapter merged after each
            stage) or ``full`` (all weights).
        train_method: the ``gainsurgery train`` method it runs.
        grid: initial half-decade lr exponents (see :func:`lr_of`), at least 4 for a front.
        side: GAIN side (``in``: W·diag(s); ``out``: diag(s)·W).
        lora_rank / lora_targets: LoRA shape (targets None: all linear layers).
        extend: whether the grid is extended until the dev optimum is interior.
        variants: staging variants this method supports beyond its default.
        description: one line for the report.
    """

    id: str
    family: str
    train_method: str
    grid: tuple[int, ...]
    side: str = "in"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] | None = None
    extend: bool = True
    variants: tuple[str, ...] = ()
    description: str = ""

    @property
    def default_variant(self) -> str:
        return {"gain": "stack", "peft": "merge", "full": "sequential"}[self.family]


METHODS: dict[str, Method] = {m.id: m for m in [
    Method("gain-ffn", "gain", "gain-ffn", (-5, -4, -3, -2), variants=("continue", "swap"),
           description="GAIN-FFN: input-side gains on attention output + FFN down projections"),
    Method("gain", "gain", "gain", (-5, -4, -3, -2), variants=("continue", "swap"),
           description="GAIN: input-side gains on attention output projections"),
    Method("gain-ffn-out", "gain", "gain-ffn", (-5, -4, -3, -2), side="out",
           description="GAIN-FFN on the output side, diag(s)·W"),
    Method("gain-out", "gain", "gain", (-5, -4, -3, -2), side="out",
           description="GAIN on the output side, diag(s)·W"),
    Method("lora", "peft", "lora", (-7, -6, -5, -4), lora_rank=8, variants=("continue",),
           description="LoRA r=8 (alpha 16) on all linear layers"),
    Method("lora-matched", "peft", "lora", (-6, -5, -4, -3), lora_rank=1, lora_targets=("o_proj", "down_proj"),
           variants=("continue",),
           description="LoRA r=1 (alpha 2) on o_proj and down_proj only: parameter-matched to GAIN-FFN"),
    Method("ia3", "peft", "ia3", (-5, -4, -3, -2),
           description="PEFT (IA)^3 with PEFT's default targets for the architecture"),
    Method("full", "full", "full", (-10, -9), extend=False,
           description="full fine-tuning, every weight trained in float32 (fp32 master weights)"),
]}

VARIANTS = {
    "stack": "gains: fresh gains per stage trained on the previous merged model; merged = base with "
             "stack(g1..gk) applied (rounded once)",
    "continue": "gains: one gain vector continued through the stages on the base; peft: one adapter "
                "continued through the stages on the base",
    "swap": "gains: each domain's gains trained on the base alone; at use time only the current domain's "
            "file is applied (zero forgetting by construction, one file per domain)",
    "merge": "peft: a fresh adapter per stage trained on the previous merged model, then merged",
    "sequential": "full: the weights are trained further at every stage",
}
