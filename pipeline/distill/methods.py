"""Registry of distillation method presets: which loss terms a method uses, and where it comes from.

A method is a recipe over four terms (B-Distill Eq. 13): L = L_SFT + L_token + lambda_1 L_MC + lambda_2 L_ERD.
``token_loss`` names a function in ``pipeline.distill.token_losses.TOKEN_LOSSES`` (None: no token-level KD)
that is called with ``token_loss_kwargs``. Every token-KD baseline here adds the SFT term, as B-Distill's
L_KD = L_SFT + L_KL (Eq. 3) does, so methods differ only in the terms that define them; ``deviation`` records
this and every other difference from the cited recipe. All teacher signals come from the offline cache, so
baselines that need the teacher to score student samples on-policy are off-policy here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.distill.token_losses import DEFAULT_AB_ALPHA, DEFAULT_AB_BETA, TOKEN_LOSSES
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class BDistillDefaults:
    """B-Distill hyper-parameters of DESIGN.md / the paper's main experiments."""

    mc_k: int = 3  # exploration length K
    mc_alpha: float = 0.2  # MC damping alpha
    erd_beta: float = 0.1  # entropy weight beta
    lambda_mc: float = 1.0  # lambda_1
    lambda_erd: float = 1.0  # lambda_2


B_DISTILL_DEFAULTS = BDistillDefaults()

_SPARSE_CACHE_NOTE = (
    "token loss on the cached sparse teacher (k kept entries + one tail bin) instead of the full vocabulary"
)
_SFT_NOTE = "SFT term added with weight 1 as in B-Distill Eq. 3, for comparability across methods"


@dataclass(frozen=True)
class MethodSpec:
    """A distillation method preset; ``get_method`` hands out copies, so editing one leaves the registry."""

    name: str
    token_loss: str | None
    token_loss_kwargs: dict[str, Any] = field(default_factory=dict)
    uses_sft: bool = False
    uses_mc: bool = False
    uses_erd: bool = False
    uses_teacher_responses: bool = False
    source: str = ""
    deviation: str = ""

    def __post_init__(self) -> None:
        if self.token_loss is not None and self.token_loss not in TOKEN_LOSSES:
            raise ConfigError(
                f"method {self.name!r} names unknown token loss {self.token_loss!r}; "
                f"valid: {sorted(TOKEN_LOSSES)}"
            )


def _b_distill(name: str, uses_mc: bool, uses_erd: bool, ablation: str) -> MethodSpec:
    return MethodSpec(
        name=name,
        token_loss="forward_kl",
        uses_sft=True,
        uses_mc=uses_mc,
        uses_erd=uses_erd,
        source="Liu et al., Balanced Knowledge Distillation for LLMs with Mixture-of-Experts (B-Distill), "
        "Eq. 13" + ablation,
        deviation=(
            "MC term uses the mean over hidden units (not the sum) so lambda_1 = 1 is scale-free; teacher "
            "gates/expert states are aggregated offline into the cache; " + _SPARSE_CACHE_NOTE
        ),
    )


_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="sft",
        token_loss=None,
        uses_sft=True,
        source="Supervised fine-tuning on the dataset responses (B-Distill Eq. 2)",
        deviation="none",
    ),
    MethodSpec(
        name="kd",
        token_loss="forward_kl",
        uses_sft=True,
        source="Hinton et al. 2015, Distilling the Knowledge in a Neural Network (forward KL, word-level KD)",
        deviation=f"{_SPARSE_CACHE_NOTE}; temperature 1 (teacher cached at T = 1); {_SFT_NOTE}",
    ),
    MethodSpec(
        name="seqkd",
        token_loss=None,
        uses_sft=True,
        uses_teacher_responses=True,
        source="Kim & Rush 2016, Sequence-Level Knowledge Distillation",
        deviation="SFT on one teacher response per prompt, generated once by the teacher cache stage",
    ),
    MethodSpec(
        name="distillm",
        token_loss="skew_forward_kl",
        token_loss_kwargs={"alpha": 0.1},
        uses_sft=True,
        source="Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for LLMs (skew KL, alpha = 0.1)",
        deviation=(
            "off-policy only: no adaptive student-generated outputs (scoring them needs an online teacher); "
            f"{_SPARSE_CACHE_NOTE}; {_SFT_NOTE}"
        ),
    ),
    MethodSpec(
        name="gkd",
        token_loss="generalized_jsd",
        token_loss_kwargs={"beta": 0.5},
        uses_sft=True,
        source="Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD, generalised JSD, "
        "beta = 0.5)",
        deviation=(
            "off-policy only (student-data fraction lambda = 0, fixed dataset responses): on-policy GKD "
            "needs the teacher to score student samples online, i.e. an online teacher on its own GPUs, "
            f"which this pipeline does not run; {_SPARSE_CACHE_NOTE}; {_SFT_NOTE}"
        ),
    ),
    MethodSpec(
        name="abkd",
        token_loss="ab_divergence",
        token_loss_kwargs={"alpha": DEFAULT_AB_ALPHA, "beta": DEFAULT_AB_BETA},
        uses_sft=True,
        source="Wang et al. 2025, ABKD: ... Knowledge Distillation via alpha-beta Divergence (ICML)",
        deviation=(
            f"(alpha, beta) = ({DEFAULT_AB_ALPHA}, {DEFAULT_AB_BETA}) fixed rather than tuned per task; "
            f"{_SPARSE_CACHE_NOTE}; {_SFT_NOTE}"
        ),
    ),
    _b_distill("b-distill", uses_mc=True, uses_erd=True, ablation=""),
    _b_distill("b-distill-no-mc", uses_mc=False, uses_erd=True, ablation=" (ablation 'w/o MC', Table 3)"),
    _b_distill("b-distill-no-erd", uses_mc=True, uses_erd=False, ablation=" (ablation 'w/o ERD', Table 3)"),
)

_BY_NAME: dict[str, MethodSpec] = {m.name: m for m in _METHODS}


def method_names() -> list[str]:
    """Names of all presets, in registry order."""
    return list(_BY_NAME)


def get_method(name: str) -> MethodSpec:
    """The preset called ``name``; ConfigError listing the valid names otherwise."""
    spec = _BY_NAME.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(
            f"unknown distillation method {name!r}; valid methods: {', '.join(_BY_NAME)}. "
            "Set the method in the config to one of them."
        )
    return replace(spec, token_loss_kwargs=dict(spec.token_loss_kwargs))
