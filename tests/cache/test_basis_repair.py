"""`moedistill cache repair` on a low-rank cache whose state basis is gone or damaged (issue 24, probe 9): the
basis is seeded and deterministic, so the repair refits it byte-identically and leaves the manifest as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from support.tiny import with_saved_teacher, write_config

from pipeline.cache.integrity.verify import verify_cache
from pipeline.cache.stage import locate_cache
from pipeline.cli import main

LOW_RANK = {"cache.states_codec": "fp8", "cache.states_rank": 8, "cache.states_basis_tokens": 200}


def _digests(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


@pytest.fixture(scope="module")
def low_rank_cache(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("basis-repair")
    config = with_saved_teacher(root, LOW_RANK)
    config_path = write_config(config, root / "config.yaml")
    assert main(["cache", "--config", config_path]) == 0
    return config_path, Path(locate_cache(config))


@pytest.mark.parametrize("damage", ["deleted", "same-size corruption"])
def test_repair_refits_a_lost_basis_byte_identically(
    low_rank_cache: tuple[str, Path], tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path, built = low_rank_cache
    cache = tmp_path / built.name  # a copy at the same key: the repair checks the directory name
    shutil.copytree(built, cache)
    before = _digests(cache)
    u = cache / "state_basis" / "u.npy"
    if damage == "deleted":
        u.unlink()
    else:
        data = bytearray(u.read_bytes())
        data[len(data) // 2] ^= 0xFF
        u.write_bytes(bytes(data))
    assert not verify_cache(str(cache)).ok
    capsys.readouterr()
    assert main(["cache", "repair", str(cache), "--config", config_path]) == 0
    out = capsys.readouterr().out
    assert "state basis refitted (byte-identical)" in out and "shards [" not in out, out
    assert _digests(cache) == before  # every file, the manifest included, as the build wrote it
    assert verify_cache(str(cache)).ok


def test_cache_on_a_complete_cache_says_what_it_checked(
    low_rank_cache: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A same-size corruption passes the quick check (sizes, commit markers); the message says so and names
    the command that checks every checksum, instead of a bare 'nothing to do'."""
    config_path, _ = low_rank_cache
    capsys.readouterr()
    assert main(["cache", "--config", config_path]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "not checksums" in out and "moedistill cache verify PATH" in out, out


def test_a_refit_that_differs_writes_nothing_and_leaves_the_manifest_as_it_was(
    low_rank_cache: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # issue 24, probe 9: the failed repair rewrote manifest.json (complete -> false, fidelity dropped)
    config_path, built = low_rank_cache
    cache = tmp_path / built.name
    shutil.copytree(built, cache)
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # The recorded basis is not what this teacher and data refit to (as after another floating-point build).
    manifest["state_basis"]["files"]["state_basis/u.npy"]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest, indent=2))
    (cache / "state_basis" / "u.npy").unlink()
    before = manifest_path.read_bytes()
    capsys.readouterr()
    assert main(["cache", "repair", str(cache), "--config", config_path]) == 2
    err = capsys.readouterr().err
    assert "refitted state basis" in err and "differs" in err, err
    assert manifest_path.read_bytes() == before  # complete and the fidelity entry kept, nothing rewritten
    assert not (cache / "state_basis" / "u.npy").exists()  # nothing written
