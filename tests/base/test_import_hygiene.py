"""Everything below Ray imports and runs where ray, zarr, numcodecs, datasets are not installed (GPU images).

Each check runs in a fresh interpreter whose first `sys.meta_path` finder refuses those packages (and the
other Ray-side dependencies absent there), so a module that imports one at import time fails here instead
of on the GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from support.paths import REPO

# Absent from the GPU image: Ray (and jsonschema, only Ray pulls it in), zarr, datasets, Rouge, matplotlib.
HIDDEN = ("ray", "zarr", "numcodecs", "datasets", "rouge_score", "jsonschema", "matplotlib")

PRELUDE = f"""
import importlib, importlib.abc, json, sys

HIDDEN = {HIDDEN!r}

class HideHeavyPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, HideHeavyPackages())
"""

# The modules the GPU path needs; every module of pipeline.models is added by the child itself.
MODULES = (
    "pipeline.distill.losses",
    "pipeline.distill.token_losses",
    "pipeline.distill.objective",
    "pipeline.distill.student",
    "pipeline.distill.methods",
    "pipeline.distill.task",
    "pipeline.cache.build.teacher",
    "pipeline.cache.build.sparsify",
    "pipeline.cache.format.shard",
    "pipeline.cache.format.codecs",
    "pipeline.training.parallel",
    "pipeline.training.optim",
    "pipeline.placement",
)

WORKLOAD = """
import pkgutil
import pipeline.models

modules = sorted(f"pipeline.models.{m.name}" for m in pkgutil.iter_modules(pipeline.models.__path__))
modules += list(MODULES)
for name in modules:
    importlib.import_module(name)

import torch
from pipeline.cache.format.shard import shard_to_row
from pipeline.cache.build.teacher import TeacherOutputSpec, compute_shard
from pipeline.cache.format.codecs import decode_states
from pipeline.config import DistillConfig
from pipeline.data.collate import distill_positions, pad_batch
from pipeline.distill.losses import mc_exploration_loss
from pipeline.distill.methods import get_method
from pipeline.distill.objective import distill_objective
from pipeline.distill.student import DistillStudent
from pipeline.models.adapter import MoEAdapter
from pipeline.models.build import TinyMoEConfig, build_tiny_moe

torch.manual_seed(0)
cfg = TinyMoEConfig(hidden_size=32, num_layers=2, num_experts=4, moe_intermediate_size=32, num_heads=2,
                    num_kv_heads=1, head_dim=16)
teacher = build_tiny_moe(cfg, 64, 0, 1, 2, seed=0)
adapter = MoEAdapter(teacher)
examples = [
    {"seq_id": 0, "input_ids": [1, 5, 6, 7, 8, 9, 2], "response_mask": [0, 0, 0, 1, 1, 1, 1]},
    {"seq_id": 1, "input_ids": [1, 10, 11, 12, 2], "response_mask": [0, 0, 1, 1, 1]},
]
batch = pad_batch(examples, 0)
mask = distill_positions(batch["response_mask"])
fwd = adapter.forward_with_experts(batch["input_ids"], batch["attention_mask"], [1], mask)
assert fwd.expert_outputs[1].shape == (int(mask.sum()), 4, 32)

out = TeacherOutputSpec(cached_layers=(1,), width=2, logits_mode="topk", logits_k=4, states_dtype="float16",
                        store_expert_states=True, teacher_responses="none", max_new_tokens=0)
shard = compute_shard(adapter, examples, 0, 2, out, micro_batch=2, pad_id=0)
assert shard.total_tokens == int(mask.sum()), shard.num_tokens
shard_to_row(shard)  # the Arrow form the Ray sink receives

targets = {name: torch.from_numpy(arr.copy()) for name, arr in shard.arrays.items()}
targets["expert_states"] = decode_states(shard.arrays["expert_states"], "float16")
gen = torch.Generator().manual_seed(0)
mc = mc_exploration_loss(targets["gates"].float()[:, 0], targets["expert_states"][:, 0],
                         torch.randn_like(targets["expert_states"][:, 0]), k=3, alpha=0.2, generator=gen)

student = DistillStudent(build_tiny_moe(TinyMoEConfig(hidden_size=16, num_layers=1, num_experts=2, top_k=1,
                                                      moe_intermediate_size=16, num_heads=2, num_kv_heads=1,
                                                      head_dim=8), 64, 0, 1, 2, seed=1).train(), [0], 32)
forward = student(batch["input_ids"], batch["attention_mask"], mask)
loss, parts = distill_objective(get_method("b-distill"), DistillConfig(), forward,
                                {"input_ids": batch["input_ids"], **targets}, mask, gen)
loss.backward()

# The per-step function the Ray Train loop calls, on the same cached targets.
from pipeline.config import Config
from pipeline.distill.task import DistillTask

task = DistillTask(Config(name="hygiene", distill=DistillConfig(method="b-distill")), tokenizer_path="unused",
                   pairs=[(0, 1)], teacher_hidden_size=32)
step_loss, step_parts = task.compute_loss(student, {"input_ids": batch["input_ids"],
                                                    "attention_mask": batch["attention_mask"],
                                                    "response_mask": batch["response_mask"], **targets}, 0)

from pipeline.cache.format import codecs

codec_ok = []
for codec in codecs.ROW_CODECS:
    payload, scales = codecs.encode_rows(targets["expert_states"], codec)
    error = (codecs.decode_rows(payload, scales, codec) - targets["expert_states"]).abs()
    codec_ok.append(bool((error <= codecs.error_bound(targets["expert_states"], codec, scales)).all()))
print(json.dumps({"modules": modules, "mc": mc.mean().item(), "loss": loss.item(), "parts": sorted(parts),
                  "step_parts": sorted(step_parts), "codecs": codec_ok}))
"""


def run_hidden(body: str, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run PRELUDE + body in a fresh interpreter from the repository root."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO, extra_path) if p is not None)
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_path_imports_and_runs_without_ray_zarr_datasets() -> None:
    body = f"MODULES = {MODULES!r}\n" + WORKLOAD
    proc = run_hidden(body)
    assert proc.returncode == 0, f"a GPU-path module needs a hidden package:\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"pipeline.models.adapter", "pipeline.cache.build.teacher"} <= set(result["modules"])
    assert result["mc"] > 0 and result["loss"] > 0
    assert {"loss_sft", "loss_forward_kl", "loss_mc", "loss_erd"} <= set(result["parts"])
    assert set(result["step_parts"]) == set(result["parts"])
    assert result["codecs"] and all(result["codecs"])


def test_the_hook_catches_a_module_that_imports_a_hidden_package(tmp_path: Path) -> None:
    """The guard itself can fail: a module importing any hidden package at import time is refused."""
    for package in HIDDEN:
        (tmp_path / f"leaky_{package}.py").write_text(f"import {package}\n")
    body = """
    caught = []
    for package in HIDDEN:
        try:
            importlib.import_module(f"leaky_{package}")
        except ImportError as e:
            caught.append(e.name)
    print(json.dumps(caught))
    """
    proc = run_hidden(body, extra_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == list(HIDDEN)
