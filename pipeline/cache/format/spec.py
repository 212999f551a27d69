"""What a teacher cache holds (CacheSpec: hashed into its key) and how it is built (CacheRuntime: not)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.cache.format.codecs import StatesCodec
from pipeline.errors import ConfigError
from pipeline.models.truncation import check_states_mass

LogitsMode = Literal["topk", "sampled"]
StatesDtype = Literal["float16", "bfloat16"]
ResponsesMode = Literal["none", "greedy", "sample"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]

FIELDS = ("logits", "gates", "expert_states", "teacher_responses")


@dataclass(frozen=True)
class KnowledgeAugmentation:
    """Knowledge augmentation (KA, Every Expert Matters: pipeline/cache/build/augment.py): R teacher forwards
    with stochastic routing, averaged; hashed into the key unless plain (R = 1, p = 0)."""

    repeats: int = 1  # R teacher forwards per sequence
    sampling_prob: float = 0.0  # p: per token and layer, the chance of sampled instead of top-k routing

    @property
    def is_plain(self) -> bool:
        return self.repeats == 1 and self.sampling_prob == 0.0

    def problems(self) -> list[str]:
        out = []
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            out.append(f"knowledge_augmentation.repeats={self.repeats!r} must be an integer >= 1")
        if not 0.0 <= float(self.sampling_prob) <= 1.0:
            out.append(f"knowledge_augmentation.sampling_prob={self.sampling_prob} must be in [0, 1]")
        return out

    def key_inputs(self) -> dict[str, Any]:
        return {"repeats": int(self.repeats), "sampling_prob": float(self.sampling_prob)}


@dataclass(frozen=True)
class CacheSpec:
    """Everything that decides the cached bytes. Student-side knobs (K, alpha, beta, E_S, losses) are absent
    on purpose: one cache serves every ablation over them."""

    teacher_path: str
    tokenizer_path: str
    cached_layers: tuple[int, ...]
    width: int | None  # cached expert width W; None = the teacher's E_T (no aggregation)
    logits_mode: LogitsMode
    logits_k: int
    states_dtype: StatesDtype
    max_length: int
    prompt_template: str
    store_expert_states: bool = True
    teacher_responses: ResponsesMode = "none"
    max_new_tokens: int = 64
    # dtype the teacher runs in: changes the cached numbers, so it is part of the key.
    compute_dtype: ComputeDtype = "float32"
    # KA: R stochastic-routing teacher forwards averaged (pipeline/cache/build/augment.py); plain by default
    knowledge_augmentation: KnowledgeAugmentation = field(default_factory=KnowledgeAugmentation)
    # Expert-state codec (pipeline/cache/format/codecs.py). states_codec None = states_dtype (the schema-1
    # setting); when set it replaces states_dtype. Rank, basis sample and token fraction need schema 2.
    states_codec: str | None = None
    states_rank: int | None = None
    states_basis_tokens: int = 65536
    states_token_fraction: float = 1.0
    # Held-out fidelity sample (pipeline/cache/build/fidelity.py): exact fp32 states of this many
    # validation-split tokens, stored beside a lossy-codec cache (schema 2) for `moedistill report
    # states-fidelity`; 0: none.
    states_fidelity_tokens: int = 256
    # Mass-truncated states (pipeline/models/truncation.py): per token and cached group, only the experts
    # carrying the top states_mass of its router mass run; 1.0 = exact (and the key of an exact cache).
    states_mass: float = 1.0

    @property
    def states(self) -> StatesCodec:
        return StatesCodec(
            codec=self.states_codec or self.states_dtype,
            rank=self.states_rank,
            basis_tokens=self.states_basis_tokens,
            token_fraction=self.states_token_fraction,
        )

    def __post_init__(self) -> None:
        # Normalise lists from YAML into a tuple so the spec stays hashable and its key canonical.
        object.__setattr__(self, "cached_layers", tuple(int(i) for i in self.cached_layers))
        if self.states_codec in ("float16", "bfloat16"):  # the schema-1 codecs: states_dtype names them
            object.__setattr__(self, "states_dtype", self.states_codec)
        problems = []
        if not self.cached_layers:
            problems.append("cached_layers is empty (list the teacher layers paired with student layers)")
        if len(set(self.cached_layers)) != len(self.cached_layers):
            problems.append(f"cached_layers {list(self.cached_layers)} has duplicates")
        if any(i < 0 for i in self.cached_layers):
            problems.append(f"cached_layers {list(self.cached_layers)} has negative indices (0-based layers)")
        if self.width is not None and self.width < 1:
            problems.append(f"width={self.width} must be >= 1 or null (= the teacher's expert count)")
        if self.logits_mode not in ("topk", "sampled"):
            problems.append(f"logits_mode={self.logits_mode!r} must be 'topk' or 'sampled'")
        if self.logits_k < 1:
            problems.append(f"logits_k={self.logits_k} must be >= 1")
        if self.states_dtype not in ("float16", "bfloat16"):
            problems.append(f"states_dtype={self.states_dtype!r} must be 'float16' or 'bfloat16'")
        if self.max_length < 2:
            problems.append(f"max_length={self.max_length} must be >= 2")
        if self.teacher_responses not in ("none", "greedy", "sample"):
            problems.append(
                f"teacher_responses={self.teacher_responses!r} must be 'none', 'greedy' or 'sample'"
            )
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        problems += self.states.problems()
        problems += check_states_mass(self.states_mass)
        if self.states_fidelity_tokens < 0:
            problems.append(
                f"states_fidelity_tokens={self.states_fidelity_tokens} must be >= 0 (0: no sample)"
            )
        problems += self.knowledge_augmentation.problems()
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            problems.append(
                f"compute_dtype={self.compute_dtype!r} must be 'float32', 'bfloat16' or 'float16'"
            )
        if problems:
            raise ConfigError(
                "invalid teacher cache spec: "
                + "; ".join(problems)
                + ". Fix: correct these in the cache section of the config."
            )


@dataclass
class CacheRuntime:
    """How the cache stage runs; changing these never changes the cache key. rows_per_shard, batch_size and
    the thread count (`threads`) do change the cached bytes (shard boundaries, float rounding),
    so the first build of a key records them in the manifest layout and every resume reuses the stored values
    (build.STORED_LAYOUT), which keeps a resumed store byte-identical to an uninterrupted one."""

    num_actors: int = 1  # teacher actors (one model replica each)
    # Sequences per teacher forward (micro-batch inside a shard); fixed by the first build of a key.
    batch_size: int = 8
    # Sequences per shard; fixed by the first build of a key. Size shards to ~100 MB-1 GB: rows_per_shard *
    # response tokens per sequence * bytes per token (see bytes_per_token_by_field).
    rows_per_shard: int = 64
    # 0: CPU teacher; (0, 1]: one GPU; > 1 (whole): one teacher split over that many GPUs (device_map="auto").
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0  # CPU threads per teacher replica (on GPU nodes: the host-side work)
    # torch threads per teacher replica; None = floor(num_cpus_per_actor), as Ray's OMP_NUM_THREADS. A resume
    # sets it to the first build's value.
    torch_threads: int | None = None
    resources: dict[str, float] | None = None  # e.g. {"teacher_node": 1} pins actors to a node group
    # Test hooks. fail_after_shards: failure injection, the write of every shard after this many commits
    # fails (leaving a staged, uncommitted shard behind). write_barrier: every write task waits until this
    # many write tasks have started (proves concurrent shard writes).
    fail_after_shards: int | None = None
    write_barrier: int | None = None
    progress: bool = True  # driver-side tqdm bar
    # "ray": the Ray Data pipeline. "local": the same per-shard code in this process, one shard after another
    # (no Ray; small caches, debugging, reference builds) -- it writes byte-identical shards.
    executor: Literal["ray", "local"] = "ray"

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_actors", "batch_size", "rows_per_shard", "torch_threads"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.executor not in ("ray", "local"):
            problems.append(f"executor={self.executor!r} must be 'ray' or 'local'")
        if self.num_cpus_per_actor <= 0:
            problems.append(f"num_cpus_per_actor={self.num_cpus_per_actor} must be > 0")
        if self.num_gpus_per_actor < 0:
            problems.append(f"num_gpus_per_actor={self.num_gpus_per_actor} must be >= 0")
        elif self.num_gpus_per_actor > 1 and not float(self.num_gpus_per_actor).is_integer():
            problems.append(
                f"num_gpus_per_actor={self.num_gpus_per_actor} must be <= 1 (one GPU, maybe shared) or a "
                "whole number (one teacher split over that many GPUs)"
            )
        if problems:
            raise ConfigError(
                "invalid cache runtime: "
                + "; ".join(problems)
                + ". Fix: correct these in the cache section of the config (or the CacheRuntime arguments)."
            )

    @property
    def threads(self) -> int:
        """torch threads of one teacher replica (default: a Ray actor's OMP_NUM_THREADS, floor(CPUs) >= 1)."""
        return self.torch_threads or max(1, int(self.num_cpus_per_actor))


@dataclass(frozen=True)
class CacheInfo:
    path: str
    key: str
    status: Literal["built", "resumed", "exists"]
    num_sequences: int
    num_tokens: int
    num_bytes: int
    # This invocation's stage measurements (empty for "exists"): wall_s, tokens, steady_tokens_per_s (tokens
    # committed after the first commit / time from first to last commit: start-up excluded).
    stats: dict[str, float] = field(default_factory=dict, compare=False)
