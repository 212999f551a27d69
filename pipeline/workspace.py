"""Where one config's stages write: every output path under `output_dir`, in one place; and the warning when
an output path would land where it is lost.

Under `ray job submit` a relative `output_dir` / `cache.root` resolves inside the job's temporary working
directory, where outputs are lost: `warn_if_job_local` says so, naming the fix.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config

# Set by Ray's job supervisor for every `ray job submit` entrypoint (ray/dashboard/modules/job/
# job_supervisor.py); RAY_JOB_ID is stripped from the entrypoint's environment since ray 2.40.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def teacher_final(self) -> Path:
        return self.root / "teacher" / "final"

    @property
    def ray_storage(self) -> Path:
        return (self.root / "ray").resolve()

    @property
    def students(self) -> Path:
        return self.root / "students"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def paths_for(config: Config) -> Paths:
    return Paths(config.out)


# --- outputs under `ray job submit` -------------------------------------------------------------------------
def ray_job_working_dir(
    environ: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> Path | None:
    """The working directory of the `ray job submit` entrypoint this process is, or None outside a job.

    With `--working-dir`, Ray unpacks the upload into a per-job temporary directory
    (<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>) and starts the entrypoint there.
    """
    env = os.environ if environ is None else environ
    if not env.get(RAY_JOB_ENV):
        return None
    return Path(cwd if cwd is not None else os.getcwd()).resolve()


def job_local_paths(
    paths: Mapping[str, str | None], environ: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> dict[str, Path]:
    """The output paths ({label: path}) that resolve inside the Ray job's working directory."""
    workdir = ray_job_working_dir(environ, cwd)
    if workdir is None:
        return {}
    local: dict[str, Path] = {}
    for label, value in paths.items():
        if not value or "://" in value:
            continue
        path = Path(value).expanduser()
        resolved = (path if path.is_absolute() else workdir / path).resolve()
        if resolved == workdir or workdir in resolved.parents:
            local[label] = resolved
    return local


def format_job_local_warning(label: str, path: Path, workdir: Path | None) -> str:
    shared = "an absolute path on storage every node shares"
    fix = {
        "output_dir": f"{shared} (output_dir: /mnt/shared/runs/<name>, the EFS mount of cluster.yaml), e.g. "
        "with --set output_dir=...",
        "cache.root": f"an s3:// URL or {shared} (cache.root: s3://<bucket>/caches), e.g. with --set "
        "cache.root=...",
    }.get(label, f"{shared} (e.g. --out /mnt/shared/reports)")
    return (
        f"moedistill: warning: {label} resolves to {path}, inside this Ray job's working directory "
        f"{workdir}: Ray unpacks --working-dir into a temporary per-job directory, so what is written "
        f"there is not on other nodes and is lost when Ray cleans it up. Fix: set {label} to {fix} "
        "(docs/cluster.md)."
    )


def warn_job_local_paths(
    paths: Mapping[str, str | None], environ: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> list[str]:
    """Print (stderr) and return one warning per output path inside the Ray job's working directory."""
    workdir = ray_job_working_dir(environ, cwd)
    warnings = [
        format_job_local_warning(label, path, workdir)
        for label, path in job_local_paths(paths, environ, cwd).items()
    ]
    for line in warnings:
        print(line, file=sys.stderr, flush=True)
    return warnings


def config_output_paths(config: Config) -> dict[str, str]:
    """What a stage of `config` writes: output_dir and cache.root."""
    return {"output_dir": str(config.out), "cache.root": config.cache.root}


def warn_if_job_local(config: Config) -> list[str]:
    """What every stage calls once it has its config: a no-op outside `ray job submit`."""
    return warn_job_local_paths(config_output_paths(config))
