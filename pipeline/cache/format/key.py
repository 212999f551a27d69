"""The content-addressed cache key: sha256 over exactly the inputs that decide the cached bytes.

Hashed (docs/cache-format.md): teacher weights digest, tokenizer digest, dataset fingerprint, prompt
template, max length, cached layers, cached width, logit sparsification, dtypes, schema version -- plus which
optional fields are stored (expert states, teacher responses), since they change the store's content too.
Never hashed: anything student-side (K, alpha, beta, lambdas, loss, E_S) or runtime-only (actors, batch size).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.cache.format.spec import CacheSpec
from pipeline.data.records import Record, records_fingerprint
from pipeline.errors import CacheError
from pipeline.storage import canonical_json

KEY_LENGTH = 20  # hex digits (80 bits): collision-free for any realistic number of caches under one root

# Files that define a model's weights / a tokenizer. Weight hashing skips tokenizer files and vice versa, so a
# model directory that also holds its tokenizer gives two independent digests.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_NAMES = ("config.json",)
_TOKENIZER_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)

_memo_lock = threading.Lock()


def _memo_path() -> Path:
    return Path(
        os.environ.get("MOEDISTILL_DIGEST_MEMO", Path.home() / ".cache" / "moedistill" / "file_digests.json")
    )


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, memoised on disk by (real path, size, mtime) so re-asking for a multi-GB checkpoint's
    cache key is instant. Hugging Face cache blobs are named by their sha256 already: used as is."""
    real = os.path.realpath(path)
    parent = os.path.basename(os.path.dirname(real))
    name = os.path.basename(real)
    if parent == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name  # HF hub LFS blob: its file name is the sha256 of its content
    st = os.stat(real)
    memo_key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    memo = _load_memo()
    if memo_key in memo:
        return memo[memo_key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    digest = h.hexdigest()
    if st.st_size >= 1 << 26:  # only big files are worth remembering
        _store_memo(memo_key, digest)
    return digest


def _load_memo() -> dict[str, str]:
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_memo(key: str, digest: str) -> None:
    with _memo_lock:
        try:
            path = _memo_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            memo = _load_memo()
            memo[key] = digest
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, path)
        except OSError:
            pass  # a memo is an optimisation; never fail a build over it


def _local_dir(name_or_path: str, what: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    try:  # a hub id already in the local HF cache (this pipeline never downloads)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:
        raise CacheError(
            f"{what} {name_or_path!r} is neither a local directory nor a model in the local Hugging Face "
            "cache, so its digest (part of the cache key) cannot be computed. Fix: pass the local "
            "checkpoint directory."
        ) from None


def _dir_digest(directory: Path, select: Any, what: str, source: str) -> str:
    files = sorted(f for f in directory.iterdir() if f.is_file() and select(f.name))
    if not files:
        raise CacheError(f"{what} directory {source!r} has no {what} files to hash. Fix: check the path.")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def teacher_weights_digest(teacher_path: str) -> str:
    d = _local_dir(teacher_path, "teacher")
    return _dir_digest(
        d, lambda n: n.endswith(_WEIGHT_SUFFIXES) or n in _WEIGHT_NAMES, "teacher weight", teacher_path
    )


def tokenizer_digest(tokenizer_path: str) -> str:
    d = _local_dir(tokenizer_path, "tokenizer")
    return _dir_digest(d, lambda n: n in _TOKENIZER_NAMES, "tokenizer", tokenizer_path)


def dataset_fingerprint(records: Sequence[Any]) -> str:
    """sha256 over the records' content and order (pipeline.data.records_fingerprint for Records)."""
    if all(isinstance(r, Record) for r in records):
        return records_fingerprint(records)
    h = hashlib.sha256()
    for r in records:
        h.update(canonical_json(r).encode())
        h.update(b"\n")
    return h.hexdigest()


def stores_fidelity_sample(spec: CacheSpec, heldout: Sequence[Any]) -> bool:
    """Whether the cache keeps a held-out fidelity sample (pipeline/cache/build/fidelity.py): its states are
    lossy (schema 2), states_fidelity_tokens > 0 and there are held-out records to draw it from."""
    lossy = spec.store_expert_states and spec.states.schema_version >= 2
    # A mass-truncated cache keeps none: its report reruns the teacher for the exact states instead.
    return lossy and spec.states_mass == 1.0 and spec.states_fidelity_tokens > 0 and len(heldout) > 0


def key_inputs(
    spec: CacheSpec, records: Sequence[Any], width: int, heldout: Sequence[Any] = ()
) -> dict[str, Any]:
    """The readable key inputs (stored in manifest.json); `width` is the resolved W.

    A cache without an expert-state codec (float16/bfloat16, full rank, every token) keeps schema 1 and its
    schema-1 inputs, so its key -- and every cache already built -- stays the same; any codec setting makes a
    schema-2 cache whose inputs add "states_codec", and "states_fidelity" when it keeps a held-out fidelity
    sample drawn from `heldout` (the validation split)."""
    states = spec.states if spec.store_expert_states else None
    version = states.schema_version if states is not None else 1
    inputs = {
        "schema_version": version,
        "teacher_weights_digest": teacher_weights_digest(spec.teacher_path),
        "tokenizer_digest": tokenizer_digest(spec.tokenizer_path),
        "dataset_fingerprint": dataset_fingerprint(records),
        "prompt_template_digest": hashlib.sha256(spec.prompt_template.encode()).hexdigest(),
        "max_length": spec.max_length,
        "cached_layers": list(spec.cached_layers),
        "width": width,
        "logit_sparsification": {"mode": spec.logits_mode, "k": spec.logits_k},
        "dtypes": {
            "compute": spec.compute_dtype,
            "logit_values": "float16",
            "logit_indices": "int32",
            "logit_tail_logmass": "float32",
            "gates": "float16",
            "expert_states": states.codec if states is not None else None,
        },
        "stored_fields": {
            "expert_states": spec.store_expert_states,
            "teacher_responses": (
                {"mode": "none"}
                if spec.teacher_responses == "none"
                else {"mode": spec.teacher_responses, "max_new_tokens": spec.max_new_tokens}
            ),
        },
    }
    if version >= 2:
        assert states is not None
        inputs["states_codec"] = states.key_inputs()
    if stores_fidelity_sample(spec, heldout):
        assert states is not None
        inputs["states_fidelity"] = {
            "tokens": spec.states_fidelity_tokens,
            "heldout_fingerprint": dataset_fingerprint(heldout),
            "seed": states.seed,
        }
    if spec.store_expert_states and spec.states_mass != 1.0:  # exact states keep their key
        inputs["states_mass"] = spec.states_mass
    if not spec.knowledge_augmentation.is_plain:  # plain KA computes the plain bytes: the plain key
        inputs["knowledge_augmentation"] = spec.knowledge_augmentation.key_inputs()
    return inputs


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()[:KEY_LENGTH]
