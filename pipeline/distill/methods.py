"""Registry of distillation method presets: which loss terms a method uses, and where it comes from.

A method is a recipe over loss terms (B-Distill Eq. 13): L = L_SFT + L_token + lambda_1 L_MC + lambda_2 L_ERD.
A preset lists its ``terms``, one ``TermUse`` line each (a name in pipeline.distill.terms.TERMS, a weight,
keyword arguments); what a term needs (cache fields, student outputs) is declared once, in TERMS. A run
resolves its method once (``resolve_method``: a ``ResolvedMethod``), and the distill stage, the tasks and the
objective read only that. Every token-KD baseline here adds the SFT term, as B-Distill's
L_KD = L_SFT + L_KL (Eq. 3) does, so methods differ only in the terms that define them; ``deviation`` records
this and every other difference from the cited recipe. A preset may also fix distill settings (its
``settings``, filled in by ``resolved_distill``: the MC variants), or use the released code's objective
instead of Eq. 13 (the released terms: b-distill-official). All teacher signals of these presets come from the
offline cache. The on-policy methods (ON_POLICY_METHODS: ImitKD, on-policy GKD, MiniLLM, DistiLLM with
student-generated outputs, DistiLLM-2) need the teacher service to score student samples: the distill stage
runs them with pipeline.distill.onpolicy_task.OnPolicyTask, their dataset batches reading the cached fields
of an offline preset (`OnPolicyMethodSpec.base`); one whose `missing` is set is refused, naming what it lacks.
SAR (Student-Aware Router) runs there too: before each student step the teacher service trains the teacher's
routers toward the student on the batch's sequences, then scores them for the student's SFT + forward KL.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from pipeline.config import DistillConfig
from pipeline.distill import onpolicy
from pipeline.distill.terms import TERMS, WEIGHTS, TermUse
from pipeline.distill.token_losses import DEFAULT_AB_ALPHA, DEFAULT_AB_BETA
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class BDistillDefaults:
    """B-Distill hyper-parameters of the paper's main experiments (docs/method.md), by the paper's names."""

    mc_k: int  # exploration length K
    mc_alpha: float  # MC damping alpha
    erd_beta: float  # entropy weight beta
    lambda_mc: float  # lambda_1
    lambda_erd: float  # lambda_2


# The values are DistillConfig's defaults: the typed config is their only source.
_DISTILL_DEFAULTS = DistillConfig()
B_DISTILL_DEFAULTS = BDistillDefaults(
    mc_k=_DISTILL_DEFAULTS.k,
    mc_alpha=_DISTILL_DEFAULTS.alpha,
    erd_beta=_DISTILL_DEFAULTS.beta,
    lambda_mc=_DISTILL_DEFAULTS.lambda_mc,
    lambda_erd=_DISTILL_DEFAULTS.lambda_erd,
)

_SPARSE_CACHE_NOTE = (
    "token loss on the cached sparse teacher (k kept entries + one tail bin) instead of the full vocabulary"
)
_SFT_NOTE = "SFT term added with weight 1 as in B-Distill Eq. 3, for comparability across methods"
# A preset may fix these; the method itself, the run name, training and logging are never a preset's.
_PRESET_SETTABLE = frozenset(f.name for f in fields(DistillConfig)) - {
    "method",
    "run_name",
    "train",
    "diagnostics",
    "token_loss_kwargs",
}


# A preset's terms, one line each (pipeline.distill.terms.TERMS names them and says what each needs).
SFT = TermUse("sft")
MC = TermUse("mc", weight="lambda_mc")
ERD = TermUse("erd", weight="lambda_erd")


def token(loss: str, **kwargs: Any) -> TermUse:
    """A token-level KD term: `loss` names a function of pipeline.distill.token_losses.TOKEN_LOSSES."""
    return TermUse(loss, kwargs=kwargs)


@dataclass(frozen=True)
class MethodSpec:
    """A distillation method preset: its loss terms (weighted, in the order they are summed) and what it
    trains on; ``get_method`` hands out copies, so editing one leaves the registry. Everything a run needs
    to know about the method (cache fields, student outputs, which Eq. 13 parts it has) is derived from
    ``terms`` and the TERMS declarations here, never from the method's name."""

    name: str
    terms: tuple[TermUse, ...]
    uses_teacher_responses: bool = False  # SFT on the cached teacher responses instead of the dataset's
    # DistillConfig fields this preset fixes (e.g. {"mc_state_loss": "relative"}); see resolved_distill.
    settings: dict[str, Any] = field(default_factory=dict)
    # The student.init the recipe trains (moe-kd: its LoRA-MoE student); None: any student.
    student_init: str | None = None
    source: str = ""
    deviation: str = ""

    def __post_init__(self) -> None:
        unknown_terms = [t.name for t in self.terms if t.name not in TERMS]
        if unknown_terms:
            raise ConfigError(
                f"method {self.name!r} names unknown loss terms {unknown_terms}; valid: {sorted(TERMS)}"
            )
        bad_weights = [t.weight for t in self.terms if isinstance(t.weight, str) and t.weight not in WEIGHTS]
        if bad_weights:
            raise ConfigError(
                f"method {self.name!r} names unknown weights {bad_weights}; valid: {sorted(WEIGHTS)}"
            )
        if len([t for t in self.terms if TERMS[t.name].kind == "token"]) > 1:
            raise ConfigError(f"method {self.name!r} names more than one token-level KD loss")
        unknown = sorted(set(self.settings) - _PRESET_SETTABLE)
        if unknown:
            raise ConfigError(f"method {self.name!r} fixes {unknown}, which are not settable distill fields")

    def _kinds(self) -> set[str]:
        return {TERMS[t.name].kind for t in self.terms}

    @property
    def uses_sft(self) -> bool:
        return "sft" in self._kinds()

    @property
    def uses_mc(self) -> bool:
        """An MC term (Eq. 8 or the released router MC): it draws experts, reading K and alpha."""
        return "mc" in self._kinds()

    @property
    def uses_erd(self) -> bool:
        """A router distillation term (Eq. 12 or the released one), reading beta."""
        return "erd" in self._kinds()

    @property
    def token_term(self) -> TermUse | None:
        return next((t for t in self.terms if TERMS[t.name].kind == "token"), None)

    @property
    def token_loss(self) -> str | None:
        """The token-level KD loss (a key of TOKEN_LOSSES); None: no token-level KD."""
        term = self.token_term
        return None if term is None else term.name

    @property
    def token_loss_kwargs(self) -> dict[str, Any]:
        term = self.token_term
        return {} if term is None else term.kwargs

    @property
    def formulas(self) -> str:
        """Which formulas: "paper" (Eq. 13) or "released" (the released code, b-distill-official)."""
        return "released" if any(TERMS[t.name].formulas == "released" for t in self.terms) else "paper"

    @property
    def outputs(self) -> frozenset[str]:
        """The student outputs beyond the logits its terms read ("router_probs", "expert_states")."""
        return frozenset().union(*(TERMS[t.name].outputs for t in self.terms))

    @property
    def needs_expert_states(self) -> bool:
        """Whether the run reads cached expert states and the student's expert outputs (Eq. 7's MC term)."""
        return "expert_states" in self.outputs

    @property
    def cache_fields(self) -> frozenset[str]:
        """The cache columns its terms read: a run reads only these (SFT reads no teacher arrays at all)."""
        fields = frozenset().union(*(TERMS[t.name].reads for t in self.terms))
        return fields | {"teacher_responses"} if self.uses_teacher_responses else fields

    def with_token_kwargs(self, kwargs: dict[str, Any]) -> MethodSpec:
        """This preset with its token loss called with `kwargs` (distill.token_loss_kwargs)."""
        terms = tuple(replace(t, kwargs=dict(kwargs)) if t is self.token_term else t for t in self.terms)
        return replace(self, terms=terms)


_B_DISTILL_SOURCE = (
    "Liu et al., Balanced Knowledge Distillation for LLMs with Mixture-of-Experts (B-Distill), Eq. 13"
)
_B_DISTILL_DEVIATION = (
    "MC term uses the mean over hidden units (not the sum) so lambda_1 = 1 is scale-free; teacher "
    "gates/expert states are aggregated offline into the cache; " + _SPARSE_CACHE_NOTE
)


def _b_distill(name: str, layer_terms: tuple[TermUse, ...], ablation: str) -> MethodSpec:
    """Eq. 13: L_SFT + L_KL + lambda_1 L_MC + lambda_2 L_ERD, or an ablation without a layer term."""
    return MethodSpec(
        name=name,
        terms=(SFT, token("forward_kl"), *layer_terms),
        source=_B_DISTILL_SOURCE + ablation,
        deviation=_B_DISTILL_DEVIATION,
    )


def _b_distill_variant(name: str, settings: dict[str, Any], change: str) -> MethodSpec:
    """`b-distill` with some MC switches fixed: the project's variants, not the paper's."""
    return replace(
        _b_distill(name, (MC, ERD), ablation=""),
        settings=settings,
        source=_B_DISTILL_SOURCE + ", with a project variant of its MC term",
        deviation=f"{change}; otherwise as b-distill: {_B_DISTILL_DEVIATION}",
    )


# The paper's released code (github.com/ljj-007/moedistill, commit 20cad41): its trainer and expert loss,
# with its fixed weights: 0.8 SFT + 0.1 token KD + 0.1 expert terms, 0.5 for the coverage KL inside them.
_RELEASED = MethodSpec(
    name="b-distill-official",
    terms=(
        TermUse("sft", 0.8),
        TermUse("forward_kl", 0.1),
        TermUse("router_mc", 0.1),
        TermUse("coverage_kl", 0.1 * 0.5),
        TermUse("released_erd", 0.1),
    ),
    settings={"k": 3, "alpha": 0.5, "beta": 0.1},
    source="the paper's released code (github.com/ljj-007/moedistill, commit 20cad41): 0.8 SFT + 0.1 token "
    "KD + 0.1 (router-level MC cross-entropy on the drawn experts + 0.5 x coverage KL + router distillation "
    "on twice-softmaxed gates), last layer pair, K = 3, alpha = 0.5, beta = 0.1, router temperature 1",
    deviation=(
        "gradients on: as released, the KD, MC and router terms are computed under no_grad, so the released "
        "student trains on 0.8 x SFT only (which equals the sft baseline under Adam); token KD is forward "
        "KL (the released cross-entropy minus the teacher entropy, a constant: same gradient) on the "
        f"{_SPARSE_CACHE_NOTE.removeprefix('token loss on the ')}; every term over response tokens only "
        "(the cache holds no prompt or padding positions; released: all positions); teacher gates folded to "
        "the student's expert count by the group sums of Eq. 6 (released: a strided one-hot); router "
        "temperature fixed at 1 (released: a clamped parameter that never trains); needs cached gates only, "
        "no expert states"
    ),
)


# MoE-KD (docs/method.md, "MoE-KD baseline"): the released code's KD stage on its own LoRA-MoE student.
_MOE_KD = MethodSpec(
    name="moe-kd",
    terms=(token("skew_reverse_kl", alpha=0.1),),  # no LM term (--lm_loss_ratio 0)
    student_init="lora-moe",
    source="Xu et al. 2024, Sparse Mixture of Experts Language Models Excel in Knowledge Distillation "
    "(MoE-KD, NLPCC); released code github.com/sprog-xhy/MoE-KD-release (src/mixture_of_experts.py, "
    "src/scripts/kd/dolly/moe-large2small-5e-5.sh): a dense student with top-2 softmax-routed LoRA experts "
    "beside its MLPs (student.init: lora-moe), supervised-fine-tuned, then distilled with skew reverse KL "
    "(skew 0.1) and no LM term (--kd_loss_type srkl --lm_loss_ratio 0)",
    deviation=(
        "the dense student is the project's dense counterpart of student.build pretrained on the training "
        "text (the one every upcycled row starts from), not a pretrained GPT-2; its LoRA experts number "
        "student.build.num_experts with student.build.top_k (demo: 4, top-2; released Dolly runs: 8, top-2), "
        "rank 16 and a = 1 on every decoder layer (student.lora_moe; as the released Dolly SFT script); the "
        "SFT stage trains every parameter on the training responses with the student_pretrain budget "
        "(released: 10 epochs at lr 5e-4) and the KD stage runs the sweep's distill.train budget like every "
        "other row (released: 5 epochs at lr 5e-5, cosine schedule, fp16); no gate metrics are logged (the "
        f"LoRA routers are not read); {_SPARSE_CACHE_NOTE}"
    ),
)


_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="sft",
        terms=(SFT,),
        source="Supervised fine-tuning on the dataset responses (B-Distill Eq. 2)",
        deviation="none",
    ),
    MethodSpec(
        name="kd",
        terms=(SFT, token("forward_kl")),
        source="Hinton et al. 2015, Distilling the Knowledge in a Neural Network (forward KL, word-level KD)",
        deviation=f"{_SPARSE_CACHE_NOTE}; temperature 1 (teacher cached at T = 1); {_SFT_NOTE}",
    ),
    MethodSpec(
        name="seqkd",
        terms=(SFT,),
        uses_teacher_responses=True,
        source="Kim & Rush 2016, Sequence-Level Knowledge Distillation",
        deviation="SFT on one teacher response per prompt, generated once by the teacher cache stage",
    ),
    MethodSpec(
        name="distillm",
        terms=(SFT, token("skew_forward_kl", alpha=0.1)),
        source="Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for LLMs (skew KL, alpha = 0.1)",
        deviation=(
            "off-policy only: no adaptive student-generated outputs (they need the teacher service to score "
            "them: that is the preset distillm-sgo); "
            f"{_SPARSE_CACHE_NOTE}; {_SFT_NOTE}"
        ),
    ),
    MethodSpec(
        name="gkd",
        terms=(SFT, token("generalized_jsd", beta=0.5)),
        source="Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD, generalised JSD, "
        "beta = 0.5)",
        deviation=(
            "off-policy only (student-data fraction lambda = 0, fixed dataset responses): on-policy GKD "
            "needs the teacher to score student samples online: that is the preset gkd-on-policy; "
            f"{_SPARSE_CACHE_NOTE}; {_SFT_NOTE}"
        ),
    ),
    MethodSpec(
        name="abkd",
        terms=(SFT, token("ab_divergence", alpha=DEFAULT_AB_ALPHA, beta=DEFAULT_AB_BETA)),
        source="Wang et al. 2025, ABKD: ... Knowledge Distillation via alpha-beta Divergence (ICML)",
        deviation=(
            f"(alpha, beta) = ({DEFAULT_AB_ALPHA}, {DEFAULT_AB_BETA}) fixed rather than tuned per task; "
            f"{_SPARSE_CACHE_NOTE}; {_SFT_NOTE}"
        ),
    ),
    _b_distill("b-distill", (MC, ERD), ablation=""),
    _b_distill("b-distill-no-mc", (ERD,), ablation=" (ablation 'w/o MC', Table 3)"),
    _b_distill("b-distill-no-erd", (MC,), ablation=" (ablation 'w/o ERD', Table 3)"),
    _RELEASED,
    _b_distill_variant(
        "b-distill-relative",
        {"mc_state_loss": "relative"},
        "MC distance ||P h_S - h~T||^2 / ||h~T||^2 per draw (scale-free in the teacher state) instead of "
        "Eq. 7's squared error",
    ),
    _b_distill_variant(
        "b-distill-cosine", {"mc_state_loss": "cosine"}, "MC distance 1 - cos(P h_S, h~T) per draw"
    ),
    _b_distill_variant(
        "b-distill-experts",
        {"mc_grad_scope": "experts"},
        "the MC term's student expert outputs are computed on the detached MoE input, so MC trains only the "
        "experts and the projections P",
    ),
    _b_distill_variant(
        "b-distill-mc-warmup",
        {"lambda_mc_warmup_steps": 100},
        "lambda_1 ramps linearly from 0 over the first 100 optimizer steps (about 40% of the demo's run)",
    ),
    _b_distill_variant(
        "b-distill-alpha0",
        {"alpha": 0.0},
        "alpha = 0: the K MC draws are distinct experts (sampling without replacement; the paper allows it, "
        "its experiments use 0.2)",
    ),
    _b_distill_variant(
        "b-distill-stable",
        {"mc_state_loss": "cosine"},
        "the project's recommended B-Distill: the cosine MC distance (1 - cos(P h_S, h~T)), chosen on the "
        "validation loss of the demo study (jobs/configs/demo-bdistill-study.yaml, 3 seeds; "
        "docs/method.md) as the best MC-on variant; it does NOT beat kd there (paired difference within seed "
        "noise), and plain b-distill-no-mc is as good",
    ),
    _MOE_KD,
)

_BY_NAME: dict[str, MethodSpec] = {m.name: m for m in _METHODS}


@dataclass(frozen=True)
class OnPolicyMethodSpec:
    """An on-policy method: `loss` names a function of pipeline.distill.onpolicy (called with `loss_kwargs`),
    `data` says which sequences a step trains on; the teacher scores student samples through the teacher
    service. `base`: the offline preset whose cached fields (and fixed settings) the dataset batches use;
    `missing`: why the distill stage cannot run it yet (empty: it can); `sgo`: DistiLLM's adaptive schedule
    (AdaptiveSGOSchedule's max_prob / step, the replay share and buffer size in batches, and how many
    validations a run makes). How OnPolicyTask runs a step: `step` (sampled: train on a batch of dataset
    rows and student samples; contrastive: both sides of every prompt; router_step: SAR), `rows` (which rows
    of a sampled batch are the student's: ONPOLICY_ROWS) and `loss_inputs` (targets: the loss takes the
    targets and logits at a temperature; samples: also the sampled tokens and lengths, a policy gradient).
    `get_method` (the offline registry) refuses these; the distill stage runs them
    (pipeline.distill.onpolicy_task.OnPolicyTask)."""

    name: str
    loss: str
    loss_kwargs: dict[str, Any]
    data: str
    source: str
    deviation: str
    base: str = "gkd"
    missing: str = ""
    sgo: dict[str, float] = field(default_factory=dict)
    step: Literal["sampled", "contrastive", "router_step"] = "sampled"
    rows: str = "student"
    loss_inputs: Literal["targets", "samples"] = "targets"

    def __post_init__(self) -> None:
        if not callable(getattr(onpolicy, self.loss, None)):
            raise ConfigError(f"on-policy method {self.name!r} names unknown loss {self.loss!r}")
        if self.rows not in ONPOLICY_ROWS:
            raise ConfigError(f"on-policy method {self.name!r}: rows {self.rows!r} not in {ONPOLICY_ROWS}")
        if (self.rows == "adaptive") != bool(self.sgo):
            raise ConfigError(f"on-policy method {self.name!r}: adaptive rows go with an sgo schedule")

    @property
    def service_calls(self) -> tuple[str, ...]:
        """The teacher-service calls a step makes (pipeline.teacher_service's client)."""
        return ("router_step", "score") if self.step == "router_step" else ("score",)


# Which rows of a sampled batch are the student's own samples: GKD draws once per batch (probability lambda),
# ImitKD per sequence (dataset share decaying over the run), MiniLLM always; DistiLLM's adaptive schedule.
ONPOLICY_ROWS = ("per_batch", "per_sequence", "student", "adaptive")
_COARSE_NOTE = "losses on the served sparse teacher (k kept entries + one tail bin), as the cache stores it"
SAR_ROUTER_LR = 1e-3  # Adam learning rate of SAR's router steps on the teacher (our choice, not the paper's)
ON_POLICY_METHODS: dict[str, OnPolicyMethodSpec] = {
    m.name: m
    for m in (
        OnPolicyMethodSpec(
            name="imitkd",
            rows="per_sequence",
            loss="imitkd_loss",
            loss_kwargs={},
            data="dataset sequences with probability beta_i (linear 1 -> 0 over training), else the "
            "student's own samples",
            source="Lin et al. 2020, Autoregressive Knowledge Distillation through Imitation Learning "
            "(ImitKD)",
            deviation="mixture chosen per sequence, not per token of a mixed-policy rollout; " + _COARSE_NOTE,
            base="kd",
        ),
        OnPolicyMethodSpec(
            name="gkd-on-policy",
            rows="per_batch",
            loss="gkd_loss",
            loss_kwargs={"beta": 0.5},
            data="the student's own samples with probability lambda = 1 per batch (else dataset responses)",
            source="Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD, generalised JSD)",
            deviation="named apart from the off-policy preset `gkd` (lambda = 0), which stays; "
            + _COARSE_NOTE,
        ),
        OnPolicyMethodSpec(
            name="minillm",
            loss_inputs="samples",
            loss="minillm_loss",
            loss_kwargs={"mix_alpha": 0.0, "whiten": True},
            data="the student's own samples",
            source="Gu et al. 2024, MiniLLM: Knowledge Distillation of Large Language Models (reverse KL by "
            "policy gradient: single-step term, length-normalised rewards, teacher-mixed sampling weights)",
            deviation="samples from the student alone (mix_alpha = 0; the paper mixes in the teacher at 0.2, "
            "which needs the teacher at every decoding step); future returns whitened over the batch as the "
            "released code does (a baseline for the policy gradient); rewards on the coarsened bins; no "
            "PPO clipping (one update per batch of samples: the ratio is 1) and no pre-training loss; "
            + _COARSE_NOTE,
            base="kd",
        ),
        OnPolicyMethodSpec(
            name="distillm-sgo",
            rows="adaptive",
            loss="distillm_loss",
            loss_kwargs={"divergence": "skl", "alpha": 0.1},
            data="student-generated outputs with an adaptive probability (raised when the validation loss "
            "rises), reused from a replay buffer, else dataset responses",
            source="Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for LLMs (skew KL, adaptive "
            "off-policy student-generated outputs)",
            deviation="schedule by our reading: the SGO probability starts at 0 and rises by 0.1 (capped at "
            "0.5) whenever the validation loss (response-token cross-entropy on the validation split, as the "
            "stage reports it, averaged over workers) rises over the previous one, measured 10 times per "
            "run (every total_steps // 10 optimizer steps); the draw is per batch; a student batch reuses "
            "samples from a per-worker replay buffer (the last 8 batches) with probability 0.5 once it holds "
            "a batch; no SFT term; named apart from the off-policy preset `distillm`; " + _COARSE_NOTE,
            base="distillm",
            sgo={"max_prob": 0.5, "step": 0.1, "replay_prob": 0.5, "replay_batches": 8, "validations": 10},
        ),
        OnPolicyMethodSpec(
            name="distillm-2",
            step="contrastive",
            loss="distillm2_loss",
            loss_kwargs={"alpha": 0.1},
            data="teacher responses (skew KL; cached by cache.teacher_responses, their targets served) and "
            "the student's own responses (skew reverse KL), both for every prompt of a batch",
            source="Ko et al. 2025, DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs",
            deviation="fixed alpha and equal weights (no curriculum on alpha, no batch reweighting); one "
            "teacher response per prompt, generated once at cache time; " + _COARSE_NOTE,
            base="seqkd",  # the cached teacher responses (cache.teacher_responses), scored by the service
        ),
        OnPolicyMethodSpec(
            name="sar",
            step="router_step",
            # the router step's objective: called as reverse_kl(student's sparse rows, teacher logits), i.e.
            # KL(teacher || student) on the student's k + 1 bins (pipeline.teacher_service.sar); the student
            # itself trains on its base preset's terms (SFT + forward KL) against the served targets
            loss="reverse_kl",
            loss_kwargs={},
            data="the batch's dataset sequences: the teacher's routers take one step toward the student's "
            "distribution on them, then the teacher (routing densely) scores them for the student",
            source="Kim, Chu, Yang 2025, Every Expert Matters: Towards Effective Knowledge Distillation for "
            "Mixture-of-Experts Language Models (SAR, Student-Aware Router)",
            deviation="a documented subset (pipeline.teacher_service.sar): router-only Adam steps at a fixed "
            f"lr = {SAR_ROUTER_LR:g}, one per student micro-batch, on the student's top-k + tail rows "
            "(k = cache.logits_k) of the dataset sequences; dense routing once the routers are trained; no "
            "other regulariser or schedule from the paper; with several training workers only rank 0 steps "
            "the routers (on its own micro-batch), every worker then scores with the updated ones; a "
            "restarted teacher actor comes back with the original routers; SFT added as in kd; "
            + _COARSE_NOTE,
            base="kd",
        ),
    )
}


def method_names() -> list[str]:
    """Names of all presets, in registry order."""
    return list(_BY_NAME)


def get_method(name: str) -> MethodSpec:
    """The preset called ``name``; ConfigError listing the valid names otherwise."""
    spec = _BY_NAME.get(name) if isinstance(name, str) else None
    if spec is None and name in ON_POLICY_METHODS:
        raise ConfigError(
            f"{name!r} is an on-policy method (its losses are in pipeline.distill.onpolicy, its teacher the "
            "teacher service), not an offline preset. Fix: run it with `moedistill distill --set "
            "distill.method=...` (run_distill drives the teacher service), or pick an offline method: "
            f"{', '.join(_BY_NAME)}."
        )
    if spec is None:
        runnable = [*_BY_NAME, *(m.name for m in ON_POLICY_METHODS.values() if not m.missing)]
        raise ConfigError(
            f"unknown distillation method {name!r}; valid methods: {', '.join(runnable)}. "
            "Set the method in the config to one of them."
        )
    terms = tuple(replace(t, kwargs=dict(t.kwargs)) for t in spec.terms)
    return replace(spec, terms=terms, settings=dict(spec.settings))


def on_policy_method(distill: DistillConfig) -> OnPolicyMethodSpec | None:
    """The on-policy preset `distill.method` (None: an offline method); ConfigError when the distill stage
    cannot run it, naming what is missing."""
    online = ON_POLICY_METHODS.get(distill.method)
    if online is not None and online.missing:
        wired = [m.name for m in ON_POLICY_METHODS.values() if not m.missing]
        raise ConfigError(
            f"on-policy method {online.name!r} cannot run yet: {online.missing}. Fix: pick a wired on-policy "
            f"method ({', '.join(wired)}) or its off-policy preset {online.base!r}."
        )
    return online


@dataclass(frozen=True)
class ResolvedMethod:
    """`distill.method` resolved once per run: what the distill stage, the tasks and the objective read.

    `name`: the method as configured (the run name, the export's record, the result); `spec`: the preset
    whose terms the student trains on (an on-policy method's: its base preset's, whose cached fields its
    dataset batches read), with distill.token_loss_kwargs applied; `distill`: the config's distill settings
    with the preset's fixed ones filled in (resolved_distill); `online`: the on-policy preset (None: offline),
    which needs the teacher service."""

    name: str
    spec: MethodSpec
    distill: DistillConfig
    online: OnPolicyMethodSpec | None = None

    @property
    def cache_fields(self) -> frozenset[str]:
        return self.spec.cache_fields

    @property
    def reads_student_routers(self) -> bool:
        """Whether it reads the student's routed MoE layers or drives the teacher service (so not a
        logits-only student such as MoE-KD's LoRA-MoE)."""
        return bool(self.spec.outputs) or self.online is not None


def resolve_method(distill: DistillConfig, student_init: str | None = None) -> ResolvedMethod:
    """The run's method, made once: ConfigError for an unknown method, an on-policy one not wired yet, a
    config that contradicts its preset's fixed settings, or (given `student_init`) a student it cannot
    train."""
    online = on_policy_method(distill)
    spec = method_for(offline_base(distill))
    method = ResolvedMethod(distill.method, spec, _with_settings(distill, spec), online)
    if student_init is not None:
        _check_student(method, student_init)
    return method


def check_method_student(distill: DistillConfig, student_init: str) -> None:
    """ConfigError when the method and the student's init do not go together (see _check_student)."""
    _check_student(resolve_method(distill), student_init)


def _check_student(method: ResolvedMethod, student_init: str) -> None:
    """A preset that trains its own student (moe-kd: the LoRA-MoE) given another, or the LoRA-MoE student (no
    routed layers the pipeline reads: logits only) given a method that needs its routers, expert states or
    the teacher service."""
    spec = method.spec
    if spec.student_init is not None and student_init != spec.student_init:
        raise ConfigError(
            f"method {spec.name!r} trains the student of student.init: {spec.student_init}, but this "
            f"student is student.init: {student_init}. Fix: --set student.init={spec.student_init}."
        )
    if student_init == "lora-moe" and method.reads_student_routers:
        raise ConfigError(
            f"the LoRA-MoE student (student.init: lora-moe) trains on logits only, but method "
            f"{method.name!r} needs the student's routed MoE layers or the teacher service. Fix: pick an "
            "offline logits-only method (moe-kd, kd, distillm, gkd, abkd, sft, seqkd), or another "
            "student.init."
        )


def offline_base(distill: DistillConfig) -> DistillConfig:
    """`distill` itself for an offline method; for an on-policy one, with its base preset as the method
    (the cached fields its dataset batches read)."""
    online = ON_POLICY_METHODS.get(distill.method)
    return replace(distill, method=online.base) if online is not None else distill


def method_for(distill: DistillConfig) -> MethodSpec:
    """The preset `distill.method`, with `distill.token_loss_kwargs` (when given) replacing its own."""
    method = get_method(distill.method)
    return method.with_token_kwargs(distill.token_loss_kwargs) if distill.token_loss_kwargs else method


def resolved_distill(distill: DistillConfig) -> DistillConfig:
    """`distill` with the fields its method preset fixes (MethodSpec.settings) filled in: what the run uses.

    A preset's value replaces the config's default; a config that sets such a field to another value is
    refused (ConfigError naming both), so a run never silently trains something other than its name says.
    An on-policy method takes its base preset's fixed settings and keeps its own name.
    """
    return _with_settings(distill, get_method(offline_base(distill).method))


def _with_settings(distill: DistillConfig, method: MethodSpec) -> DistillConfig:
    defaults = DistillConfig()
    for key, value in method.settings.items():
        current = getattr(distill, key)
        if current != value and current != getattr(defaults, key):
            raise ConfigError(
                f"method {method.name!r} fixes distill.{key} = {value!r}, but the config sets {current!r}. "
                f"Fix: remove distill.{key} from the config, or use a method that leaves it free "
                "(b-distill)."
            )
    return replace(distill, **method.settings) if method.settings else distill
