"""Stage 0: supervised fine-tuning of the MoE teacher with Ray Train, with before/after figures."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass

from pipeline.config import Config, ModelConfig, config_to_dict, teacher_fields
from pipeline.data.rouge import mean_rouge_l
from pipeline.data.stage import load_tokenizer, prepare_data
from pipeline.data.tokenize import tokenize_records
from pipeline.finetune.task import SupervisedTask
from pipeline.locks import run_lock
from pipeline.models.compat import check_models_share_tokenizer
from pipeline.models.export import export_is_complete
from pipeline.models.generate import generate_responses, validation_loss
from pipeline.models.stage import load_for_evaluation
from pipeline.placement import run_placed_like
from pipeline.run_identity import SETTINGS_FILE, claim_run_dir
from pipeline.training.loop import LoopSpec, plan_total_steps
from pipeline.training.runner import fit
from pipeline.workspace import paths_for


@dataclass(frozen=True)
class FinetuneResult:
    export_dir: str
    skipped: bool
    train_examples: int
    train_tokens: int
    wall_s: float
    tokens_per_s: float
    num_parameters: int
    before: dict[str, float]
    after: dict[str, float]


def run_finetune(config: Config, *, force: bool = False, eval_examples: int = 128) -> FinetuneResult:
    """Fine-tune the teacher (or reuse a finished export) and report validation loss and Rouge-L."""
    import ray

    paths = paths_for(config)
    prepared = prepare_data(config)
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    # The student is checked too: a tokenizer mismatch found after the teacher's fine-tuning wastes it.
    check_models_share_tokenizer(config, tokenizer)
    train_examples, stats = tokenize_records(tokenizer, prepared.teacher_train, config.data.max_length)
    val_examples, _ = tokenize_records(tokenizer, prepared.splits.validation, config.data.max_length)
    print(
        f"[finetune] data: {len(train_examples)} train / {len(val_examples)} validation examples "
        f"({stats.num_too_long} longer than {config.data.max_length} tokens dropped)",
        flush=True,
    )
    export_dir = paths.teacher_final
    test_records = prepared.splits.test[:eval_examples]
    teacher_dir = paths.root / "teacher"
    ray_run_name = f"{config.name}-finetune-teacher"
    # One process fine-tunes this teacher at a time: a second command (another sweep, a rerun) waits, then
    # finds the export finished and reuses it.
    with run_lock(teacher_dir, "teacher fine-tune"):
        if force:  # forget the old run entirely, or Ray Train would resume from its last checkpoint
            (teacher_dir / SETTINGS_FILE).unlink(missing_ok=True)
            shutil.rmtree(paths.ray_storage / ray_run_name, ignore_errors=True)
            shutil.rmtree(export_dir, ignore_errors=True)
            shutil.rmtree(teacher_dir / "metrics", ignore_errors=True)
        claim_run_dir(
            teacher_dir,
            teacher_fields(config),
            what="the fine-tuned teacher",
            fix="rerun with `moedistill finetune-teacher --force` to retrain it (caches of the old teacher "
            "stay valid under their own keys), or give this config its own output_dir.",
        )
        if export_is_complete(export_dir):
            print(
                f"[finetune] teacher already fine-tuned at {export_dir}; reusing it (--force retrains)",
                flush=True,
            )
            skipped, wall = True, 0.0
        else:
            skipped = False
            train_tokens = sum(len(e["input_ids"]) for e in train_examples)
            spec = LoopSpec(
                train=config.finetune,
                total_steps=plan_total_steps(config.finetune, len(train_examples)),
                rows_per_epoch=len(train_examples),
                export_dir=str(export_dir),
                metrics_dir=str(paths.root / "teacher" / "metrics"),
            )
            task_cfg = config.teacher
            tok_path = prepared.tokenizer_path
            started = time.perf_counter()
            fit(
                lambda: SupervisedTask(task_cfg, tok_path),
                spec,
                run_name=ray_run_name,
                storage_path=str(paths.ray_storage),
                datasets={"train": ray.data.from_items(train_examples)},
            )
            wall = time.perf_counter() - started
    train_tokens = sum(len(e["input_ids"]) for e in train_examples)
    epochs_tokens = (
        train_tokens * config.finetune.epochs
        if config.finetune.max_steps is None
        else (
            config.finetune.max_steps
            * config.finetune.batch_size
            * config.finetune.grad_accum_steps
            * max(1, config.finetune.num_workers)  # 0: one in-process loop
            * train_tokens
            / max(1, len(train_examples))
        )
    )
    summary_path = teacher_dir / "finetune_summary.json"
    earlier = json.loads(summary_path.read_text()) if skipped and summary_path.exists() else None
    if earlier is not None:  # a reused teacher: its figures were measured when it was trained
        num_parameters, before, after = earlier["num_parameters"], earlier["before"], earlier["after"]
    else:

        def measure(model_cfg: ModelConfig) -> tuple[int, dict[str, float]]:
            # Where the teacher trains, never on the job driver (pipeline.training.placed).
            args = (model_cfg, prepared.tokenizer_path, val_examples, test_records)
            return run_placed_like(config.finetune, _figures, *args)

        num_parameters, before = measure(config.teacher)
        _, after = measure(ModelConfig(path=str(export_dir)))
    result = FinetuneResult(
        export_dir=str(export_dir),
        skipped=skipped,
        train_examples=len(train_examples),
        train_tokens=train_tokens,
        wall_s=wall,
        tokens_per_s=epochs_tokens / wall if wall > 0 else 0.0,
        num_parameters=num_parameters,
        before=before,
        after=after,
    )
    teacher_dir.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(
        json.dumps({**dataclasses.asdict(result), "config": config_to_dict(config)}, indent=2, default=str)
    )
    return result


def _figures(
    model_cfg: ModelConfig, tokenizer_path: str, val_examples: list[dict], test_records: list
) -> tuple[int, dict[str, float]]:
    """(parameters, {val_loss, rouge_l}) of one teacher, greedy on the test records; runs as a placed task."""
    tokenizer = load_tokenizer(tokenizer_path)
    model = load_for_evaluation(model_cfg, tokenizer)
    predictions = generate_responses(model, tokenizer, test_records, greedy=True, max_new_tokens=48)
    return sum(p.numel() for p in model.parameters()), {
        "val_loss": validation_loss(model, val_examples, tokenizer.pad_token_id),
        "rouge_l": mean_rouge_l(predictions, [r.response for r in test_records]),
    }


def format_finetune_result(result: FinetuneResult) -> str:
    lines = [
        f"teacher: {result.num_parameters / 1e6:.2f}M parameters, export {result.export_dir}",
        f"training: {result.train_examples} examples, {result.wall_s:.0f} s, "
        f"{result.tokens_per_s:.0f} tokens/s" + (" (reused finished export)" if result.skipped else ""),
        "               before    after",
        f"val loss     {result.before['val_loss']:8.3f} {result.after['val_loss']:8.3f}",
        f"Rouge-L      {result.before['rouge_l']:8.3f} {result.after['rouge_l']:8.3f}",
    ]
    return "\n".join(lines)
