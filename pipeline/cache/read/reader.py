"""Reading a teacher cache: per-sequence training examples, re-aggregated from the cached width W to E_S.

Two readers share one shard decoder: `TeacherCache.read_sequence` / `read_shard` (plain Python, tests and
small use) and `read_cache_dataset` (a Ray Dataset, one read task per shard, streamed into Ray Train).
Column projection: only the zarr arrays behind the requested fields are opened, and only the chunks of the
requested teacher layers are read, so a run that needs no expert states never touches them.

Output row (numpy): seq_id int64, input_ids int32 [T], response_mask int8 [T], num_tokens int32, and per field
  logits:            logit_indices int32 [n, k], logit_values float32 [n, k], logit_tail_logmass float32 [n]
  gates:             gates float32 [n, P', E]
  expert_states:     expert_states float32 [n, P', E, D]
  teacher_responses: teacher_response int32 [R]
with n = num_tokens distillation positions, P' = the requested teacher layers (in the order asked), E = E_S.
Schema-2 caches (expert-state codecs) decode through pipeline/cache/read/states.py: the same expert_states, or
expert_state_coeffs for states_space="subspace", plus expert_state_mask [n] when token-subsampled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from pipeline import storage as cfs
from pipeline.cache.format import schema
from pipeline.cache.format.codecs import GroupBasis, StatesCodec, decode_states
from pipeline.cache.format.key import tokenizer_digest
from pipeline.cache.format.manifest import read_manifest
from pipeline.cache.format.shard import committed_shards, open_arrays, read_index
from pipeline.cache.format.spec import FIELDS
from pipeline.cache.integrity.checks import check_before_read, ensure_verified, verify_shards
from pipeline.cache.read.states import group_basis_for, read_states
from pipeline.errors import CacheError
from pipeline.models.alignment import aggregate_expert_states, aggregate_gates, check_reaggregation

_RESUME_HINT = "rerun `moedistill cache --config ...` to resume it"


class TeacherCache:
    """A complete cache opened for reading (see open_cache)."""

    def __init__(self, path: str, manifest: dict[str, Any]) -> None:
        self.path = path.rstrip("/")
        self.manifest = manifest
        inputs = manifest["key_inputs"]
        self.key: str = manifest["key"]
        self.cached_layers: list[int] = list(inputs["cached_layers"])
        self.width: int = int(inputs["width"])
        self.hidden_size: int = int(manifest["teacher"]["hidden_size"])
        self.vocab_size: int = int(manifest["teacher"]["vocab_size"])
        self.logits_k: int = int(inputs["logit_sparsification"]["k"])
        self.states_dtype: str | None = inputs["dtypes"]["expert_states"]
        self.has_expert_states: bool = bool(inputs["stored_fields"]["expert_states"])
        self.has_teacher_responses: bool = inputs["stored_fields"]["teacher_responses"]["mode"] != "none"
        self.schema_version: int = schema.version_of(manifest)
        self.states = StatesCodec.from_key_inputs(inputs.get("states_codec"), self.states_dtype)
        self._seq_to_shard: dict[int, tuple[int, int]] | None = None

    # --- metadata -------------------------------------------------------------------------------------------
    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def num_sequences(self) -> int:
        return int(self.manifest["totals"]["num_sequences"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["totals"]["num_tokens"])

    def shard_url(self, shard_id: int) -> str:
        return cfs.join(self.path, self.shards[shard_id]["path"])

    def check_student(
        self,
        vocab_size: int | None = None,
        teacher_layers_needed: Sequence[int] | None = None,
        num_student_experts: int | None = None,
        hidden_size: int | None = None,
        fields: Iterable[str] = (),
        allow_projection: bool = True,
    ) -> None:
        """CacheError (what is wrong + how to fix it) unless a student like this can train from the cache.

        hidden_size is the student's; a mismatch with the cached teacher size D is fine when the student
        learns a projection (allow_projection, the B-Distill default) and an error otherwise.
        """
        fields = set(fields)
        unknown = fields - set(FIELDS)
        if unknown:
            raise CacheError(
                f"unknown cache fields {sorted(unknown)}. Fix: request only fields of {list(FIELDS)}."
            )
        if vocab_size is not None and int(vocab_size) != self.vocab_size:
            raise CacheError(
                f"the student's vocabulary has {vocab_size} entries but the cache holds teacher logits over "
                f"{self.vocab_size}: cached token ids would index the wrong logits. Fix: build the student "
                f"with vocab_size={self.vocab_size} and the teacher's tokenizer."
            )
        if teacher_layers_needed is not None:
            missing = sorted(set(int(t) for t in teacher_layers_needed) - set(self.cached_layers))
            if missing:
                raise CacheError(
                    f"the student's layer pairs need teacher layers {missing}, which this cache does not "
                    f"hold (cached: {self.cached_layers}). Fix: rebuild the cache with cached_layers "
                    f"covering {sorted(set(int(t) for t in teacher_layers_needed))} "
                    "(pipeline.distill.losses.layer_pairs), or pick a student layer count whose pairs are "
                    "cached."
                )
        if num_student_experts is not None:
            try:
                check_reaggregation(self.width, int(num_student_experts))
            except ValueError:
                n, w = int(num_student_experts), self.width
                divisors = [d for d in range(1, w + 1) if w % d == 0]
                e_t = int(self.manifest["teacher"]["num_experts"])
                widths = [m for m in range(n, e_t + 1, n)]  # cache widths this student could fold from
                rebuild = (
                    f", or rebuild the cache with cache.width in {widths}"
                    if widths
                    else f" (at most the teacher's {e_t}: every student expert needs a teacher expert)"
                )
                raise CacheError(
                    f"cache {self.key} (expert width {w}) cannot be re-aggregated to {n} student experts: "
                    f"the student expert count must divide the cached width. Fix: use one of {divisors} "
                    f"student experts{rebuild}."
                ) from None
        if "expert_states" in fields and not self.has_expert_states:
            raise CacheError(
                f"this run needs expert states but cache {self.key} was built without them. Fix: rebuild it "
                "with store_expert_states: true, or use a method that needs no expert states."
            )
        if "teacher_responses" in fields and not self.has_teacher_responses:
            raise CacheError(
                f"this run needs teacher-generated responses (SeqKD) but cache {self.key} has none. Fix: "
                "rebuild it with teacher_responses: greedy (or sample)."
            )
        if hidden_size is not None and int(hidden_size) != self.hidden_size and not allow_projection:
            raise CacheError(
                f"the student's hidden size {hidden_size} differs from the cached teacher hidden size "
                f"{self.hidden_size} and no projection is allowed. Fix: enable the learned student->teacher "
                "projection, or use a student with the teacher's hidden size."
            )

    def check_tokenizer(self, tokenizer_path: str) -> None:
        """CacheError unless `tokenizer_path` holds the tokenizer the cache was built with: cached token ids
        and teacher logits mean something only under that tokenizer."""
        if tokenizer_digest(tokenizer_path) != self.manifest["key_inputs"]["tokenizer_digest"]:
            raise CacheError(
                f"cache {self.key} was built with another tokenizer than this config's ({tokenizer_path}): "
                "its token ids and teacher logits would be misread. Fix: use the tokenizer the cache was "
                "built with (tokenizer.path), or rebuild the cache with `moedistill cache --config <this "
                "config>`."
            )

    def layer_positions(self, teacher_layers: Sequence[int] | None) -> list[int]:
        """Positions along the cached layer axis of `teacher_layers` (None = all, in cached order)."""
        if teacher_layers is None:
            return list(range(len(self.cached_layers)))
        self.check_student(teacher_layers_needed=teacher_layers)
        return [self.cached_layers.index(int(t)) for t in teacher_layers]

    # --- reading --------------------------------------------------------------------------------------------
    def read_shard(
        self,
        shard_id: int,
        fields: Iterable[str],
        num_student_experts: int | None = None,
        teacher_layers: Sequence[int] | None = None,
        seq_ids: Iterable[int] | None = None,
        states_space: str = "full",
    ) -> list[dict[str, Any]]:
        """Per-sequence examples of one shard (optionally only `seq_ids`), in seq_id order. states_space
        "subspace" (a low-rank cache): expert_state_coeffs over `group_basis` instead of expert_states."""
        fields = set(fields)
        self.check_student(num_student_experts=num_student_experts, fields=fields)
        positions = self.layer_positions(teacher_layers)
        return _decode_shard(self, shard_id, fields, num_student_experts, positions, seq_ids, states_space)

    def group_basis(
        self, num_student_experts: int | None = None, teacher_layers: Sequence[int] | None = None
    ) -> GroupBasis:
        """The per-(pair, student expert) bases V [P', E_S, D, q] of expert_state_coeffs (h~ = V c~) of a
        low-rank cache; CacheError naming the basis file when it is missing or corrupt."""
        if self.states.rank is None:
            raise CacheError(
                f"cache {self.key} stores full expert states, so it has no state basis. Fix: use "
                "distill.mc_state_space: full, or rebuild the cache with cache.states_rank set."
            )
        positions = self.layer_positions(teacher_layers)
        return group_basis_for(self.path, self.manifest, positions, num_student_experts or self.width)

    def read_sequence(
        self,
        seq_id: int,
        fields: Iterable[str] = ("logits", "gates", "expert_states"),
        num_student_experts: int | None = None,
        teacher_layers: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        shard_id = self._locate(seq_id)
        return self.read_shard(shard_id, fields, num_student_experts, teacher_layers, seq_ids=[seq_id])[0]

    def _locate(self, seq_id: int) -> int:
        if self._seq_to_shard is None:
            self._seq_to_shard = {}
            for s in self.shards:
                ids = (
                    read_index(self.shard_url(s["shard_id"]), columns=["seq_id"]).column("seq_id").to_pylist()
                )
                for row, sid in enumerate(ids):
                    self._seq_to_shard[int(sid)] = (int(s["shard_id"]), row)
        if int(seq_id) not in self._seq_to_shard:
            raise CacheError(
                f"sequence {seq_id} is not in cache {self.key} (it holds {self.num_sequences} sequences; "
                "records longer than max_length were dropped at tokenisation). Fix: read a cached seq_id "
                "(each shard's index lists them), or rebuild with a larger max_length to keep it."
            )
        return self._seq_to_shard[int(seq_id)][0]


def open_cache(path: str) -> TeacherCache:
    """Open a complete cache; CacheError when there is none, it is incomplete or of unknown schema version."""
    manifest = read_manifest(path)
    if manifest is None:
        raise CacheError(
            f"no teacher cache at {path} (no {schema.MANIFEST}). Fix: build it with `moedistill cache "
            "--config ...`, or pass the ROOT/<key> directory that `moedistill cache ls ROOT` lists."
        )
    schema.validate_manifest(manifest, f"{path}/{schema.MANIFEST}")
    if not manifest["complete"]:
        n_done = len(committed_shards(path))
        raise CacheError(
            f"teacher cache {path} is incomplete ({n_done} of {manifest['layout']['num_shards']} shards "
            f"committed, no completion marker): its build was interrupted. Fix: {_RESUME_HINT}."
        )
    return TeacherCache(path, manifest)


def _decode_shard(
    cache: TeacherCache,
    shard_id: int,
    fields: set[str],
    num_student_experts: int | None,
    positions: list[int],
    seq_ids: Iterable[int] | None,
    states_space: str = "full",
) -> list[dict[str, Any]]:
    url = cache.shard_url(shard_id)
    ensure_verified(cache.path, cache.shards[shard_id], fields)  # sha256 once per process and file
    cols = ["seq_id", "input_ids", "response_mask", "token_offset", "num_tokens"]
    if "teacher_responses" in fields:
        cols.append("teacher_response")
    try:
        index = read_index(url, columns=cols).to_pydict()
    except (FileNotFoundError, OSError) as e:
        raise CacheError(
            f"cannot read shard {shard_id} of {cache.path}: {e}. Fix: run `moedistill cache verify "
            f"{cache.path}` and rebuild the damaged shard."
        ) from None
    rows = range(len(index["seq_id"]))
    if seq_ids is not None:
        wanted = {int(s) for s in seq_ids}
        rows = [i for i in rows if int(index["seq_id"][i]) in wanted]
    # Read only the token range the selected sequences span (a single sequence reads ~one chunk).
    spans = [(int(index["token_offset"][i]), int(index["num_tokens"][i])) for i in rows]
    lo = min((a for a, _ in spans), default=0)
    hi = max((a + n for a, n in spans), default=0)
    tokens = _read_token_arrays(cache, url, fields, num_student_experts, positions, lo, hi, states_space)
    out = []
    for i, (offset, n) in zip(rows, spans, strict=True):
        start = offset - lo
        ex: dict[str, Any] = {
            "seq_id": int(index["seq_id"][i]),
            "input_ids": np.asarray(index["input_ids"][i], dtype=np.int32),
            "response_mask": np.asarray(index["response_mask"][i], dtype=np.int8),
            "num_tokens": n,
        }
        for name, arr in tokens.items():
            ex[name] = arr[start : start + n]
        if "teacher_responses" in fields:
            ex["teacher_response"] = np.asarray(index["teacher_response"][i], dtype=np.int32)
        out.append(ex)
    return out


def _read_token_arrays(
    cache: TeacherCache,
    url: str,
    fields: set[str],
    num_student_experts: int | None,
    positions: list[int],
    lo: int,
    hi: int,
    states_space: str = "full",
) -> dict[str, np.ndarray]:
    """Per-token rows [lo, hi) of the shard for `fields`, decoded to float32 and re-aggregated to E_S."""
    needed = set(fields) & {"logits", "gates", "expert_states"}
    if not needed:
        return {}
    group = open_arrays(url)
    rows = slice(lo, hi)
    out: dict[str, np.ndarray] = {}
    if "logits" in needed:
        out["logit_indices"] = group["logit_indices"][rows]
        out["logit_values"] = group["logit_values"][rows].astype(np.float32)
        out["logit_tail_logmass"] = group["logit_tail_logmass"][rows].astype(np.float32)
    e_s = num_student_experts or cache.width
    gates_w = None
    if "gates" in needed or ("expert_states" in needed and e_s != cache.width):
        gates_w = torch.from_numpy(_layers(group["gates"], rows, positions).astype(np.float32))
    if "gates" in needed:
        assert gates_w is not None
        out["gates"] = _agg_gates(gates_w, e_s, cache.width).numpy()
    if "expert_states" in needed and cache.schema_version > 1:
        out.update(
            read_states(
                cache.states,
                lambda name, r: _layers(group[name], r, positions),
                lambda: group["expert_state_rows"][:],
                lo,
                hi,
                gates_w,
                e_s,
                cache.width,
                lambda: cache.group_basis(e_s, [cache.cached_layers[p] for p in positions]),
                states_space,
            )
        )
    elif "expert_states" in needed:
        arr = group["expert_states"]
        states_w = decode_states(_layers(arr, rows, positions), arr.attrs["logical_dtype"])
        if e_s != cache.width:
            assert gates_w is not None
            # Composition: W-width gates weight the W-width states; equals folding E_T -> E_S directly.
            states_w = aggregate_expert_states(gates_w, states_w, e_s)
        out["expert_states"] = states_w.numpy()
    return out


def _layers(arr: Any, rows: slice, positions: list[int]) -> np.ndarray:
    """arr[rows, positions] by basic slicing: zarr's orthogonal (list) selection is ~50x slower here.

    Every slice covers one layer, so only the requested layers' chunks are read (chunks are 1 layer deep).
    """
    first = positions[0] if positions else 0
    if positions == list(range(first, first + len(positions))):  # contiguous (incl. empty): one slice
        return arr[rows, first : first + len(positions)]
    return np.stack([arr[rows, p] for p in positions], axis=1)


def _agg_gates(gates_w: torch.Tensor, e_s: int, width: int) -> torch.Tensor:
    if e_s == width:
        return gates_w
    return aggregate_gates(gates_w, e_s)


# --- Ray Dataset --------------------------------------------------------------------------------------------
def _read_shard_batch(
    batch: dict[str, np.ndarray],
    path: str,
    fields: list[str],
    num_student_experts: int | None,
    teacher_layers: list[int] | None,
    states_space: str = "full",
) -> dict[str, np.ndarray]:
    cache = open_cache(path)  # tiny (one JSON read) and keeps the task self-contained
    examples: list[dict[str, Any]] = []
    for shard_id in batch["shard_id"]:
        examples.extend(
            cache.read_shard(int(shard_id), fields, num_student_experts, teacher_layers, None, states_space)
        )
    if not examples:
        return {}
    out: dict[str, np.ndarray] = {}
    for name in examples[0]:
        values = [ex[name] for ex in examples]
        if isinstance(values[0], np.ndarray):
            col = np.empty(len(values), dtype=object)  # ragged per-sequence arrays -> Ray tensor columns
            col[:] = values
            out[name] = col
        else:
            out[name] = np.asarray(values, dtype=np.int64 if name == "seq_id" else np.int32)
    return out


def read_cache_dataset(
    path: str,
    fields: set[str],
    num_student_experts: int | None = None,
    teacher_layers: list[int] | None = None,
    verify_checksums: bool = True,
    states_space: str = "full",
    with_state_mask: bool = False,
) -> Any:
    """A Ray Dataset with one row per cached sequence (see the module docstring for the columns).

    One read task per shard (shards are the unit of parallelism); all checks run on the driver first, so a
    mismatch fails before any task starts. verify_checksums: hash every file the read will open first (one
    Ray task per shard, pipeline.cache.integrity.checks); off, each read task still hashes what it opens.
    states_space: "subspace" for coefficients of a low-rank cache (pipeline/cache/read/states.py);
    with_state_mask: the consumer honours expert_state_mask (required for a token-subsampled cache).
    """
    import ray

    cache = open_cache(path)
    fields = set(fields)
    cache.check_student(
        teacher_layers_needed=teacher_layers, num_student_experts=num_student_experts, fields=fields
    )
    items = [{"shard_id": int(s["shard_id"])} for s in cache.shards if s["num_rows"] > 0]
    if not items:
        raise CacheError(
            f"cache {path} holds no sequences. Fix: check max_length and the dataset, then rebuild it."
        )
    # Before any read task (and so before any training step): sizes and commit markers, then checksums.
    check_before_read(cache.path, cache.manifest, fields)
    if verify_checksums:
        verify_shards(cache.path, cache.manifest, fields)
    if "expert_states" in fields and cache.states.subsampled and not with_state_mask:
        raise CacheError(
            f"cache {cache.key} stores expert states for {cache.states.token_fraction:.0%} of the tokens "
            "(zeros plus expert_state_mask elsewhere), and this reader's consumer does not average the MC "
            "term over that mask. Fix: train from a cache with cache.states_token_fraction: 1, or pass "
            "with_state_mask=True from a loss that masks."
        )
    if "expert_states" in fields and cache.states.rank is not None:
        cache.group_basis(num_student_experts, teacher_layers)  # a missing/corrupt basis fails here, named
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        _read_shard_batch,
        fn_kwargs={
            "path": cache.path,
            "fields": sorted(fields),
            "num_student_experts": num_student_experts,
            "teacher_layers": None if teacher_layers is None else [int(t) for t in teacher_layers],
            "states_space": states_space,
        },
        batch_size=1,
    )
