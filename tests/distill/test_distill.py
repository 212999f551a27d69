"""Student distillation from a real teacher cache on a local Ray cluster: the module's copy of the session's
fine-tuned tiny teacher and cache. Real Ray Train workers where distribution is the subject (DDP on two gloo
workers run twice, FSDP2 killed and resumed, one worker killed and resumed); in-process runs
(`num_workers: 0`) where it is not (run names, locks, sweeps, upcycled students)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support.paths import TINY
from support.tiny import SHARED_TEACHER, tiny_moe
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import Config, DistillConfig, with_overrides
from pipeline.distill.losses import aggregate_expert_states, aggregate_gates, layer_pairs
from pipeline.distill.methods import get_method
from pipeline.distill.objective import distill_objective
from pipeline.distill.stage import default_run_name, run_distill
from pipeline.distill.student import DistillStudent
from pipeline.distill.task import DistillTask
from pipeline.errors import CacheError
from pipeline.models.adapter import MoEAdapter
from pipeline.training.loop import FAIL_AT_STEP_ENV


@pytest.fixture(scope="module")
def cached_config(tiny_workspace: Config) -> Config:
    """The module's copy of the fine-tuned tiny teacher and its cache (conftest), shared by its tests."""
    return tiny_workspace


# Ray Train's local mode: for tests whose subject is not the workers
IN_PROCESS = {"distill.train.num_workers": 0}


@contextlib.contextmanager
def teacher_unreachable(config: Config) -> Iterator[None]:
    """Move the teacher checkpoint away: the student side must never need it."""
    teacher = Path(config.output_dir) / "teacher" / "final"
    hidden = teacher.with_name("final-moved-away")
    shutil.move(teacher, hidden)
    try:
        yield
    finally:
        shutil.move(hidden, teacher)


def test_two_worker_b_distill_from_cache_exports_a_working_student(cached_config: Config) -> None:
    config = with_overrides(cached_config, {"distill.train.num_workers": 2, "distill.train.max_steps": 4})
    with teacher_unreachable(config):
        result = run_distill(config)
    assert not result.skipped
    metrics = [json.loads(x) for x in (Path(result.export_dir).parent / "metrics" / "metrics.jsonl").open()]
    last = metrics[-1]
    for key in ("loss_sft", "loss_forward_kl", "loss_mc", "loss_erd", "gate_entropy/pair0", "load/pair0/e0"):
        assert key in last, key
    assert abs(last["load/pair0/e0"] + last["load/pair0/e1"] - 1.0) < 1e-4  # load shares sum to 1
    student = AutoModelForCausalLM.from_pretrained(result.export_dir)
    assert not any("projection" in name for name, _ in student.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(result.export_dir)
    prompt = tokenizer("### Instruction:\nName a color.\n\n### Response:\n", return_tensors="pt")
    generated = student.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    # Asking again is a no-op: the finished run is reused, not retrained.
    assert run_distill(config).skipped
    # Stopped after the export but before its summary.json: the rerun measures the export, never crashes.
    (Path(result.export_dir).parent / "summary.json").unlink()
    again = run_distill(config)
    assert again.skipped and abs(again.val_loss - result.val_loss) < 1e-6
    # DDP is deterministic: the same config trained again (another run name) gives identical weights and
    # losses, each worker its half of every batch.
    twin = run_distill(with_overrides(config, {"distill.run_name": "ddp-twin"}))
    assert not twin.skipped
    assert weights_digest(twin.export_dir) == weights_digest(result.export_dir)
    assert twin.val_loss == result.val_loss


def killed_at_step_3_then_rerun(config: Config, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A worker dies at step 3 (after the step-2 checkpoint); the same command again resumes. -> metrics."""
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")
    with pytest.raises(Exception, match=r"(?i)fail|error|died"):
        run_distill(config)
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    result = run_distill(config)
    metrics_dir = Path(result.export_dir).parent / "metrics"
    assert (metrics_dir / "resumes.log").read_text().strip() == "resumed at step 2"
    return [json.loads(x) for x in (metrics_dir / "metrics.jsonl").open()]


def test_killed_distillation_resumes_from_its_checkpoint(
    cached_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B-Distill (its MC draws use the RNG) on one worker, killed at step 3 and resumed; then the same config
    trained uninterrupted. Equal weights prove both the exact resume and that two runs of one config agree."""
    config = with_overrides(cached_config, {"distill.method": "b-distill", "distill.train.max_steps": 6})
    metrics = killed_at_step_3_then_rerun(config, monkeypatch)
    assert [m["step"] for m in metrics] == [2, 4, 6]
    # The resumed student is the uninterrupted one: RNG, optimizer, scheduler and data position restored.
    resumed = run_distill(config)
    uninterrupted = run_distill(with_overrides(config, {"distill.run_name": "uninterrupted"}))
    assert resumed.skipped and not uninterrupted.skipped
    assert weights_digest(resumed.export_dir) == weights_digest(uninterrupted.export_dir)
    assert resumed.val_loss == uninterrupted.val_loss


def weights_digest(export_dir: str) -> str:
    return hashlib.sha256((Path(export_dir) / "model.safetensors").read_bytes()).hexdigest()


def test_two_worker_fsdp_run_resumes_and_exports(
    cached_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FSDP2 on gloo: sharded B-Distill training, killed mid-run, resumed from its full-state checkpoint."""
    config = with_overrides(
        cached_config,
        {"distill.train.num_workers": 2, "distill.train.strategy": "fsdp", "distill.train.max_steps": 4},
    )
    metrics = killed_at_step_3_then_rerun(config, monkeypatch)
    assert [m["step"] for m in metrics] == [2, 4] and all(m["loss_mc"] > 0 for m in metrics)
    result = run_distill(config)  # finished: reused
    assert result.skipped and result.val_loss < 20
    student = AutoModelForCausalLM.from_pretrained(result.export_dir)  # gathered, unsharded weights
    assert not any(type(p).__name__ == "DTensor" for p in student.parameters())


def test_student_that_does_not_fit_the_cache_gets_a_clear_error(cached_config: Config) -> None:
    config = with_overrides(cached_config, {"student.build.num_experts": 3})
    with pytest.raises(CacheError, match=r"divide"):
        run_distill(config)


def _other_tokenizer(config: Config, out: Path):
    """A tokenizer of the same size as the pipeline's but trained on other text: other ids for tokens."""
    from pipeline.data.demo_tokenizer import train_demo_tokenizer

    texts = [f"{w} {w[::-1]} zq{i} {i * 7}" for i, w in enumerate(["alpha", "kappa", "omega", "sigma"] * 50)]
    return train_demo_tokenizer(texts, out, vocab_size=config.tokenizer.vocab_size)


def test_student_with_another_tokenizer_is_refused_before_any_work(cached_config: Config, tmp_path: Path):
    from pipeline.errors import ModelError
    from pipeline.models.build import TinyMoEConfig

    student_dir = tmp_path / "student"
    other = _other_tokenizer(cached_config, student_dir)
    tiny_moe(TinyMoEConfig(hidden_size=32, num_layers=1, num_experts=2, top_k=1), len(other)).save_pretrained(
        student_dir
    )
    config = with_overrides(cached_config, {"student.build": None, "student.path": str(student_dir)})
    with pytest.raises(ModelError, match=r"student checkpoint .* ships a tokenizer that differs.*Fix:"):
        run_distill(config)


def test_cache_of_another_tokenizer_is_refused(cached_config: Config, tmp_path: Path) -> None:
    from pipeline.cache.stage import locate_cache

    cache_path = locate_cache(cached_config)
    _other_tokenizer(cached_config, tmp_path / "tok")
    config = with_overrides(cached_config, {"tokenizer.path": str(tmp_path / "tok")})
    with pytest.raises(CacheError, match=r"built with another tokenizer.*Fix:"):
        run_distill(config, cache_path=cache_path)


def test_cache_of_a_retrained_teacher_is_refused(cached_config: Config) -> None:
    marker = Path(cached_config.output_dir) / "teacher" / "final" / "moedistill_export.json"
    original = marker.read_text()
    marker.write_text(json.dumps({**json.loads(original), "time": 1.0}))  # as if exported again later
    try:
        with pytest.raises(CacheError, match=r"fine-tuned again after cache .* Fix: run `moedistill cache"):
            run_distill(cached_config)
    finally:
        marker.write_text(original)


def test_explicit_run_name_reused_with_other_settings_is_refused(
    cached_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.errors import ConfigError
    from pipeline.locks import RUN_LOCK_FILE, WAIT_ENV, DirectoryLock
    from pipeline.workspace import paths_for

    config = with_overrides(
        cached_config,
        {"distill.method": "sft", "distill.run_name": "named", "distill.train.max_steps": 2, **IN_PROCESS},
    )
    assert not run_distill(config).skipped
    assert run_distill(with_overrides(config, {"distill.train.log_every": 1})).skipped  # runtime-only change
    # another process (e.g. a second sweep sharing the run) holds the run: this one waits, here 0 s
    run_dir = paths_for(config).students / "named"
    monkeypatch.setenv(WAIT_ENV, "0")
    held = DirectoryLock(str(run_dir), what="student run", holder="run", lock_file=RUN_LOCK_FILE)
    busy = r"another run is writing the student run .*pid \d+.*Fix: wait"
    with held, pytest.raises(CacheError, match=busy):
        run_distill(config)
    assert not (run_dir / RUN_LOCK_FILE).exists() and run_distill(config).skipped
    with pytest.raises(ConfigError, match=r"distill\.train\.lr: 0\.003 -> 0\.01.*Fix: choose another"):
        run_distill(with_overrides(config, {"distill.train.lr": 0.01}))


def test_missing_cache_names_the_command_to_run(cached_config: Config, tmp_path: Path) -> None:
    config = with_overrides(cached_config, {"cache.root": str(tmp_path / "empty")})
    with pytest.raises(CacheError, match=r"moedistill cache --config"):
        run_distill(config)


def test_one_b_distill_step_sends_gradient_to_every_paired_student_part() -> None:
    """Experts (all of them, not only the top-k), routers and projections all receive gradient."""
    torch.manual_seed(0)
    from pipeline.models.build import TinyMoEConfig

    teacher = tiny_moe(TinyMoEConfig(hidden_size=48, num_layers=4, num_experts=4), 64, seed=0)
    student = tiny_moe(TinyMoEConfig(hidden_size=32, num_layers=2, num_experts=2, top_k=1), 64, seed=1)
    pairs = layer_pairs(4, 2)
    input_ids = torch.randint(3, 64, (2, 12))
    attention = torch.ones_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, 6:] = 1
    from pipeline.data.collate import distill_positions

    token_mask = distill_positions(response_mask)
    with torch.no_grad():
        t_out = MoEAdapter(teacher).forward_with_experts(
            input_ids, attention, [t for _, t in pairs], token_mask
        )
    gates = torch.stack([aggregate_gates(t_out.router_probs[t], 2) for _, t in pairs], dim=1)
    states = torch.stack(
        [aggregate_expert_states(t_out.router_probs[t], t_out.expert_outputs[t], 2) for _, t in pairs], dim=1
    )
    logits = t_out.logits[token_mask]
    top = torch.log_softmax(logits, -1).topk(8, dim=-1)
    batch = {
        "input_ids": input_ids,
        "logit_indices": top.indices,
        "logit_values": top.values,
        "logit_tail_logmass": torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6)),
        "gates": gates,
        "expert_states": states,
    }
    model = DistillStudent(student.train(), [s for s, _ in pairs], teacher_hidden_size=48)
    forward = model(input_ids, attention, token_mask)
    loss, parts = distill_objective(get_method("b-distill"), DistillConfig(), forward, batch, token_mask)
    loss.backward()
    assert parts["loss_mc"] > 0 and "loss_erd" in parts
    for s, _ in pairs:
        block = student.model.layers[s].mlp
        for name, param in [
            ("router", block.gate.weight),
            ("gate_up", block.experts.gate_up_proj),
            ("down", block.experts.down_proj),
        ]:
            assert param.grad is not None, (s, name)
            per_expert = (
                param.grad.abs().flatten(1).sum(1) if param.grad.ndim == 3 else param.grad.abs().sum(1)
            )
            assert (per_expert > 0).all(), (s, name, per_expert)
    for projection in model.projections:
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0


def test_distill_task_collate_rejects_targets_of_other_tokenisation() -> None:
    import numpy as np

    task = DistillTask.__new__(DistillTask)
    task.method = get_method("kd")

    class _Tok:
        pad_token_id = 0

    task._tokenizer = _Tok()

    def column(*rows: np.ndarray) -> np.ndarray:  # Ray Data's ragged numpy column: an object array of arrays
        out = np.empty(len(rows), dtype=object)
        out[:] = list(rows)
        return out

    batch = {
        "seq_id": np.array([0]),
        "input_ids": column(np.array([5, 6, 7, 8])),
        "response_mask": column(np.array([0, 0, 1, 1])),  # 2 distillation positions
        "logit_indices": column(np.zeros((3, 4), dtype=np.int32)),  # but 3 cached rows
    }
    with pytest.raises(CacheError, match=r"different tokenisation"):
        task.collate(batch)


def test_sweep_reuses_the_one_cache_for_every_run(cached_config: Config, tmp_path: Path, capsys) -> None:
    """`moedistill ablate`: the cache is found (not rebuilt), >= 3 runs read it, a rerun skips them all."""
    import csv

    import yaml

    from pipeline.flows import run_ablate

    caches_before = sorted(Path(cached_config.cache.root).glob("*/manifest.json"))
    sweep = {
        "name": "t",
        "base": str(TINY),
        "set": {
            **SHARED_TEACHER,  # the module's teacher and cache, found, not trained or built again
            "output_dir": cached_config.output_dir,
            "cache.root": cached_config.cache.root,
            **IN_PROCESS,
            "distill.train.max_steps": 2,
            "evaluate.max_examples": 4,
            "evaluate.num_seeds": 1,
        },
        "grid": {"distill.method": ["sft", "kd", "b-distill-no-mc"]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    first = run_ablate(path)
    assert first["cache"].status == "exists" and first["trained"] == 3
    assert sorted(Path(cached_config.cache.root).glob("*/manifest.json")) == caches_before
    assert "found once, read by 3 student run(s)" in capsys.readouterr().out
    with open(Path(cached_config.output_dir) / "sweeps" / "t" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["model"] for r in rows} == {"teacher"} | {r.run_name for r in first["runs"]}
    assert all(r["val_loss"] for r in rows if r["model"] != "teacher")
    assert (Path(cached_config.output_dir) / "sweeps" / "t" / "results.png").stat().st_size > 0

    second = run_ablate(path)  # rerun: every run finished, nothing trains again
    assert second["trained"] == 0 and all(r.skipped for r in second["runs"])


def test_upcycled_student_init_is_pretrained_once_and_reused(cached_config: Config) -> None:
    """student.init: upcycle -> a dense student pretrained once (fixed budget), upcycled for every run."""
    from pipeline.finetune.student_init import dense_student_dir, resolve_student

    config = with_overrides(
        cached_config,
        {
            "student.init": "upcycle",
            "student_pretrain.max_steps": 2,
            "student_pretrain.batch_size": 8,
            "student_pretrain.num_workers": 0,
            **IN_PROCESS,
            "distill.method": "kd",
            "distill.train.max_steps": 2,
        },
    )
    result = run_distill(config)
    dense = dense_student_dir(config) / "final"
    assert (dense / "config.json").is_file() and not result.skipped
    assert json.loads((dense / "config.json").read_text())["model_type"] == "qwen3"  # dense, then upcycled
    stamp = (dense / "model.safetensors").stat().st_mtime_ns
    other = with_overrides(config, {"distill.method": "sft"})
    assert default_run_name(other, "k") != default_run_name(config, "k")
    resolved = resolve_student(other)  # another method: the same pretrained student, not trained again
    assert resolved.upcycle_from == str(dense) and resolved.num_experts == config.student.build.num_experts
    assert (dense / "model.safetensors").stat().st_mtime_ns == stamp
    # The budget is part of every upcycled run's identity.
    longer = with_overrides(config, {"student_pretrain.max_steps": 3})
    assert default_run_name(longer, "k") != default_run_name(config, "k")
    assert dense_student_dir(longer) != dense_student_dir(config)


def test_mse_mc_from_a_token_subsampled_cache_warns_and_names_the_fix(cached_config: Config, capsys) -> None:
    """docs/method.md, "Token subsampling": the MSE MC distance trains worse from a subsampled cache (not a
    bug: fewer MC tokens per step). The run says so once and names the fix; the cosine distance is quiet."""
    from pipeline.cache.stage import run_cache

    config = with_overrides(
        cached_config,
        {"cache.states_token_fraction": 0.5, "distill.train.max_steps": 1, "distill.method": "b-distill"}
        | IN_PROCESS,
    )
    run_cache(config)
    run_distill(config)
    warned = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warned) == 1 and "50%" in warned[0] and "distill.mc_state_loss=cosine" in warned[0], warned
    run_distill(with_overrides(config, {"distill.method": "b-distill-stable"}))
    assert "warning" not in capsys.readouterr().out
