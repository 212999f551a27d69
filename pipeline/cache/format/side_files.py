"""The files a cache keeps beside its shards, each written once, recorded in manifest.json (size and sha256)
and checked against that record before use: the low-rank state basis (state_basis/, schema 2 with
cache.states_rank) and the held-out fidelity sample (fidelity/, schema 2 lossy caches). The build computes
them (pipeline/cache/build/basis.py, fidelity.py); here they are written, read and checked, so readers,
verify and the build share one account of them.

The fidelity sample's arrays (.npy, under fidelity/):

  seq_ids        int64   [m]            the record's index in the held-out list
  seq_lengths    int32   [m]            len(input_ids) of each sequence
  num_tokens     int32   [m]            its sample tokens: its first num_tokens distillation positions
  input_ids      int32   [sum lengths]  the sequences, concatenated
  response_mask  int8    [sum lengths]
  gates          float32 [n, P, W]      exact W-width gates
  exact_states   float32 [n, P, W, D]   exact W-width expert states (the fp32 targets)
  expert_states, expert_state_scales, expert_state_rows: the same tokens encoded exactly as a shard stores
                 them (codecs.ShardStateRows: codec, basis projection, token subsampling)
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline import storage as cfs
from pipeline.cache.format.codecs import StateBasis
from pipeline.errors import CacheError

BASIS_DIR = "state_basis"
BASIS_FILES = {"u": f"{BASIS_DIR}/u.npy", "mean": f"{BASIS_DIR}/mean.npy"}
BASIS_FIX = (
    "Fix: delete the cache directory and rerun `moedistill cache --config ...` (its shards were encoded with "
    "that basis, so they cannot be kept without it)."
)
FIDELITY_DIR = "fidelity"
FIDELITY_FIX = (
    "Fix: run `moedistill cache repair <cache path> --config <the config that built it>` (it recomputes the "
    "sample from the validation split; no shard depends on it)."
)


# --- .npy files recorded in the manifest ---------------------------------------------------------------
def _npy(arr: np.ndarray, dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=dtype), allow_pickle=False)  # deterministic bytes
    return buf.getvalue()


def npy_files(directory: str, arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """{directory/<name>.npy: its bytes} (little-endian, each array's own dtype)."""
    return {
        f"{directory}/{name}.npy": _npy(arr, np.dtype(arr.dtype).newbyteorder("<").str)
        for name, arr in arrays.items()
    }


def write_npy_files(cache_url: str, directory: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write each array as directory/<name>.npy (little-endian, its own dtype); return the manifest's
    {relative path: {bytes, sha256}} record of them."""
    return write_files(cache_url, directory, npy_files(directory, arrays))


def write_files(cache_url: str, directory: str, files: dict[str, bytes]) -> dict[str, Any]:
    """Write {relative path: bytes} under `directory` atomically; -> their {bytes, sha256} record."""
    fs, root = cfs.get_fs(cache_url)
    fs.makedirs(cfs.join(root, directory), exist_ok=True)
    for rel, data in files.items():
        cfs.write_atomic(fs, cfs.join(root, rel), data)
    return {rel: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for rel, d in files.items()}


def file_problems(cache_url: str, files: dict[str, Any], what: str) -> list[str]:
    """'<what> file REL is missing / corrupted (...)' for each recorded file whose size or sha256 differs."""
    fs, root = cfs.get_fs(cache_url)
    out = []
    for rel, want in sorted(files.items()):
        path = cfs.join(root, rel)
        if not fs.exists(path):
            out.append(f"{what} file {rel} is missing")
            continue
        data = fs.cat_file(path)
        if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            out.append(
                f"{what} file {rel} is corrupted ({len(data)} bytes, manifest says {want['bytes']}; sha256 "
                f"differs)"
            )
    return out


def read_npy(cache_url: str, rel: str) -> np.ndarray:
    fs, root = cfs.get_fs(cache_url)
    return np.load(io.BytesIO(fs.cat_file(cfs.join(root, rel))), allow_pickle=False)


# --- the state basis ---------------------------------------------------------------------------------------
def basis_arrays(basis: StateBasis) -> dict[str, np.ndarray]:
    return {name: getattr(basis, name).numpy().astype(np.float32) for name in BASIS_FILES}


def write_basis(cache_url: str, basis: StateBasis, num_tokens: int) -> dict[str, Any]:
    """Write the basis files; return the manifest.state_basis record."""
    arrays = basis_arrays(basis)
    files = write_npy_files(cache_url, BASIS_DIR, arrays)
    return {"rank": basis.rank, "num_tokens": int(num_tokens), "files": files}


def basis_problems(cache_url: str, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the cache's basis (missing record, missing/short/corrupt file), naming the file,
    each without its fix (BASIS_FIX); [] when the cache needs no basis or its basis is intact."""
    codec = manifest["key_inputs"].get("states_codec") or {}
    if codec.get("rank") is None:
        return []
    record = manifest.get("state_basis")
    if record is None:
        if not manifest["complete"]:
            return []  # a build killed before the basis was written: the resume fits it
        return [f"the cache stores rank-{codec['rank']} coefficients but manifest.json has no state_basis"]
    return file_problems(cache_url, record["files"], "basis")


def read_basis(cache_url: str, manifest: dict[str, Any]) -> StateBasis:
    """The cache's basis, checked against manifest.state_basis; CacheError naming the file otherwise."""
    problems = basis_problems(cache_url, manifest)
    if problems or manifest.get("state_basis") is None:
        what = "; ".join(problems) or "it stores full states and has no state_basis"
        raise CacheError(f"teacher cache {cfs.redact(cache_url)}: {what}. {BASIS_FIX}")
    arrays = {name: torch.from_numpy(read_npy(cache_url, rel)) for name, rel in BASIS_FILES.items()}
    return StateBasis(arrays["u"], arrays["mean"])


# --- the fidelity sample -----------------------------------------------------------------------------------
@dataclass
class FidelitySample:
    arrays: dict[str, np.ndarray]  # the files of the module docstring, by name

    @property
    def num_tokens(self) -> int:
        return int(self.arrays["exact_states"].shape[0])

    def examples(self) -> list[dict[str, Any]]:
        """The sample's sequences as tokenised examples {seq_id, input_ids, response_mask, num_tokens}."""
        a = self.arrays
        ends = np.cumsum(a["seq_lengths"])
        return [
            {
                "seq_id": int(s),
                "input_ids": a["input_ids"][end - length : end].tolist(),
                "response_mask": a["response_mask"][end - length : end].tolist(),
                "num_tokens": int(n),
            }
            for s, length, n, end in zip(a["seq_ids"], a["seq_lengths"], a["num_tokens"], ends, strict=True)
        ]


def fidelity_problems(cache_url: str, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the cache's fidelity sample (record missing from a complete cache whose key says
    it keeps one, file missing or corrupt), each without its fix (FIDELITY_FIX); [] when none or intact."""
    if "states_fidelity" not in manifest["key_inputs"]:
        return []
    record = manifest.get("states_fidelity")
    if record is None:
        if not manifest["complete"]:
            return []  # a build killed before the sample was written: the resume computes it
        return ["the cache key says it keeps a fidelity sample but manifest.json has no states_fidelity"]
    return file_problems(cache_url, record["files"], "fidelity sample")


def has_fidelity_sample(manifest: dict[str, Any]) -> bool:
    return manifest.get("states_fidelity") is not None


def read_fidelity_sample(cache_url: str, manifest: dict[str, Any]) -> FidelitySample:
    """The stored sample, checked against manifest.states_fidelity; CacheError naming the fix otherwise."""
    record = manifest.get("states_fidelity")
    if record is None:
        raise CacheError(
            f"teacher cache {manifest['key']} keeps no held-out fidelity sample (it was built without one: "
            "plain float16/bfloat16 states, cache.states_fidelity_tokens: 0, no validation split, or an "
            "older moedistill). Fix: rebuild it with a lossy states codec, cache.states_fidelity_tokens > 0 "
            "and data.val_fraction > 0, or use `--source teacher` (reruns the teacher on cached sequences)."
        )
    problems = file_problems(cache_url, record["files"], "fidelity sample")
    if problems:
        raise CacheError(f"teacher cache {cfs.redact(cache_url)}: {'; '.join(problems)}. {FIDELITY_FIX}")
    arrays = {rel.rsplit("/", 1)[-1][: -len(".npy")]: read_npy(cache_url, rel) for rel in record["files"]}
    return FidelitySample(arrays)
