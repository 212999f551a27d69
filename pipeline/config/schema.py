"""The typed configuration: one frozen dataclass per section of a YAML preset, with its defaults.

Every stage reads the same file, so one YAML describes a whole experiment: data, teacher, student, the
teacher cache, distillation and evaluation. Loading and validation: pipeline/config/load.py; the content
identities hashed from these fields: pipeline/config/identity.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class DataConfig:
    source: str = "demo"  # "demo" (bundled generator), a .jsonl/.json path, or a datasets name/path
    split: str = "train"  # split passed to datasets.load_dataset
    num_demo_records: int = 3000
    max_records: int | None = None  # cap after loading (quick experiments)
    max_length: int = 128  # tokens; longer examples are dropped and counted, never silently truncated
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 0
    strict: bool = False  # malformed records: error (strict) or skip and count
    prompt_template: Literal["dolly"] = "dolly"  # pipeline.data.template (the one template so far)
    # The teacher-knows-more regime (docs/method.md, "The demo regime"): null = every stage trains on the
    # whole training split. N = the students (distillation, the cache, the dense pretraining of `init:
    # upcycle`) see a seeded subset of N training records, and the teacher fine-tunes on `teacher_train`:
    # "all" training records, or only the "rest" the students never see (so the cache is not built on what
    # it learnt).
    student_train_records: int | None = None
    teacher_train: Literal["all", "rest"] = "all"


@dataclass(frozen=True)
class TokenizerConfig:
    path: str | None = None  # HF id or local dir; None: train the demo tokenizer on the demo data
    vocab_size: int = 1024  # only for the demo tokenizer


@dataclass(frozen=True)
class ArchitectureConfig:
    """A tiny Qwen3-MoE built from scratch (demo and tests): the `build:` section of a model.

    pipeline.models.build.TinyMoEConfig extends it with the initialisation details a config never sets.
    """

    hidden_size: int = 256
    num_layers: int = 4
    num_experts: int = 4
    top_k: int = 2
    moe_intermediate_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class LoraMoEConfig:
    """`student.init: lora-moe` (MoE-KD's student, pipeline.models.lora_moe): the dense counterpart of
    `student.build` with a mixture of `student.build.num_experts` LoRA experts (top `student.build.top_k`) of
    rank `rank`, scaled by `alpha`, beside the MLP of `layers` (null: every decoder layer)."""

    layers: list[int] | None = None
    rank: int = 16  # the released Dolly SFT script's r
    alpha: float = 1.0  # the released code's default a


@dataclass(frozen=True)
class ModelConfig:
    """Where a model comes from: exactly one of `path`, `upcycle_from`, `build`."""

    path: str | None = None  # an MoE causal LM: HF hub id or local directory
    upcycle_from: str | None = None  # a dense causal LM (Qwen3 / Llama) turned into its MoE counterpart
    num_experts: int = 4  # for upcycling
    top_k: int = 2  # for upcycling
    upcycle_noise_std: float = 0.0
    build: ArchitectureConfig | None = None
    seed: int = 0
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Students only: "upcycle" starts from a dense counterpart of `build` pretrained for the fixed budget
    # `student_pretrain`, upcycled to MoE (pipeline.finetune.student_init); "random": from scratch;
    # "lora-moe": that dense student with LoRA experts (`lora_moe`), fine-tuned on the responses (MoE-KD).
    init: Literal["random", "upcycle", "lora-moe"] = "random"
    lora_moe: LoraMoEConfig = field(default_factory=LoraMoEConfig)


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 1  # 0: in-process (Ray Train local mode; no persisted checkpoints, so no resume)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # e.g. {"student_node": 0.01}
    batch_size: int = 16  # per worker, per micro-step
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50  # optimizer steps
    keep_checkpoints: int = 2
    max_failures: int = 1  # FailureConfig: worker failures retried from the last checkpoint
    log_every: int = 10
    strategy: Literal["ddp", "fsdp"] = "ddp"
    seed: int = 0
    # CPU training: Ray sets OMP_NUM_THREADS to a worker's CPUs (often 1); a lone worker may use more.
    torch_threads: int | None = None


@dataclass(frozen=True)
class KnowledgeAugmentationConfig:
    """KA (pipeline/cache/build/augment.py): `repeats` stochastic-routing teacher forwards per sequence,
    each token routed by sampling with probability `sampling_prob`; the cache stores their averaged
    distribution."""

    repeats: int = 1
    sampling_prob: float = 0.0

    @property
    def is_plain(self) -> bool:
        return self.repeats == 1 and self.sampling_prob == 0.0


@dataclass(frozen=True)
class CacheConfig:
    root: str = "runs/caches"  # local path or fsspec URL (s3://bucket/caches)
    layers: Literal["paired", "all"] | list[int] = "paired"  # teacher MoE layers to cache
    width: int | None = None  # cached expert width W; None = the teacher's expert count
    logits_mode: Literal["topk", "sampled"] = "topk"
    logits_k: int = 64  # top-k entries, or number of importance samples
    states_dtype: Literal["float16", "bfloat16"] = "float16"
    # Expert-state codec (docs/cache-format.md, schema v2). null = states_dtype; when set it replaces it.
    # fp8/int8: 1 B per value + a float16 scale per row; states_rank r: r coefficients per row over a basis
    # fitted on states_basis_tokens tokens; states_token_fraction f: states for a hashed subset of tokens.
    states_codec: Literal["float16", "bfloat16", "fp8", "int8"] | None = None
    states_rank: int | None = None
    states_basis_tokens: int = 65536
    states_token_fraction: float = 1.0
    # Exact fp32 states of this many validation tokens kept beside a schema-2 cache (never trained on), for
    # `moedistill report states-fidelity`; 0: none.
    states_fidelity_tokens: int = 256
    # Mass-truncated states: per token and cached expert group, only the teacher experts carrying the top
    # states_mass of the group's router mass are computed (renormalised in the group); 1.0 = exact states.
    states_mass: float = 1.0
    store_expert_states: bool = True
    teacher_responses: Literal["none", "greedy", "sample"] = "none"  # for SeqKD
    max_new_tokens: int = 64
    num_actors: int = 1
    batch_size: int = 8  # sequences per teacher forward
    rows_per_shard: int = 64  # sequences per shard
    num_gpus_per_actor: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # e.g. {"teacher_node": 1}
    knowledge_augmentation: KnowledgeAugmentationConfig = field(default_factory=KnowledgeAugmentationConfig)


@dataclass(frozen=True)
class DistillConfig:
    method: str = "b-distill"
    k: int = 3  # MC exploration length
    alpha: float = 0.2  # MC damping
    beta: float = 0.1  # ERD entropy weight
    lambda_mc: float = 1.0
    lambda_erd: float = 1.0
    temperature: float = 1.0
    token_loss_kwargs: dict[str, float] = field(default_factory=dict)
    # MC variants (docs/method.md); the defaults are the paper as written. A method preset may fix them.
    mc_state_loss: Literal["mse", "relative", "cosine"] = "mse"  # per-draw distance of the MC term
    mc_grad_scope: Literal["model", "experts"] = "model"  # experts: MC trains the experts and P only
    # subspace (a low-rank cache, cache.states_rank): the MC distance on the cached coefficients, never
    # reconstructing [N, E, D] targets; equal to full on the reconstructed states (docs/method.md).
    mc_state_space: Literal["full", "subspace"] = "full"
    lambda_mc_warmup_steps: int = 0  # lambda_mc ramps linearly from 0 over these optimizer steps
    # Per-term gradient norms/cosines every train.log_every steps (one extra backward per term on those
    # steps); changes no weights, so it is not part of the run's settings fingerprint.
    diagnostics: bool = False
    # default: "<method>-k<k>-a<alpha>-b<beta>-e<E_S>-s<seed>-<settings fingerprint>"
    run_name: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class MultipleChoiceConfig:
    """One multiple-choice test set (pipeline.evaluate.multiple_choice): accuracy by option log-likelihood."""

    name: str  # its column in the results table
    path: str | None = None  # a local .jsonl / .json / .csv (formats: pipeline/evaluate/multiple_choice.py)
    # a `datasets` name, name:config (e.g. cais/mmlu:anatomy); "demo": the bundled demo-world set
    dataset: str | None = None
    split: str = "test"  # of a `datasets` source
    limit: int | None = None  # first N items
    # plain: "question, lettered choices, Answer:" (base LMs); instruction: the same in the training
    # template; response: the question alone in the template, each option scored as the response
    prompt_style: Literal["plain", "instruction", "response"] = "plain"


@dataclass(frozen=True)
class EvalConfig:
    num_seeds: int = 3
    greedy: bool = False  # protocol of the public KD papers: sampling, temperature 1, top_p 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 16
    max_examples: int | None = None
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # per actor, e.g. {"student_node": 1}
    test_sets: list[str] = field(default_factory=list)  # extra Dolly-format JSONL / datasets names
    # data.source demo: examples per held-out demo set (paraphrase, composition, entities:
    # docs/evaluation.md), at most max_examples; 0: the test split alone
    heldout_examples: int = 100
    multiple_choice: list[MultipleChoiceConfig] = field(default_factory=list)  # accuracy, not Rouge-L


@dataclass(frozen=True)
class Config:
    name: str
    output_dir: str = ""  # default: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    # The dense student's pretraining budget when student.init is "upcycle" (the same for every method).
    student_pretrain: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")
