"""Teacher/student compatibility checks: token-level KD compares distributions over the SAME token ids."""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.errors import ModelError

_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id")


def _id_to_token(tokenizer: Any) -> dict[int, str]:
    return {int(i): tok for tok, i in tokenizer.get_vocab().items()}


def vocabulary_differences(a: Any, b: Any, names: tuple[str, str] = ("teacher", "student")) -> list[str]:
    """How two tokenizers differ (empty when they map the same strings to the same ids, same specials)."""
    problems: list[str] = []
    if len(a) != len(b):
        problems.append(f"vocabulary size {len(a)} ({names[0]}) vs {len(b)} ({names[1]})")
    vocab_a, vocab_b = _id_to_token(a), _id_to_token(b)
    for i in sorted(vocab_a.keys() | vocab_b.keys()):
        if vocab_a.get(i) != vocab_b.get(i):
            problems.append(
                f"first differing token: id {i} is {vocab_a.get(i)!r} ({names[0]}) "
                f"vs {vocab_b.get(i)!r} ({names[1]})"
            )
            break
    for attr in _SPECIAL_IDS:
        x, y = getattr(a, attr, None), getattr(b, attr, None)
        if x != y:
            problems.append(f"{attr} {x} ({names[0]}) vs {y} ({names[1]})")
    return problems


def check_same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Raise ModelError unless both tokenizers map the same strings to the same ids, same special tokens."""
    problems = vocabulary_differences(teacher_tokenizer, student_tokenizer)
    if problems:
        raise ModelError(
            "teacher and student tokenizers differ, so teacher logits cannot supervise student logits: "
            + "; ".join(problems)
            + ". Fix: use the teacher's tokenizer for the student (build the student with "
            "vocab_size=len(teacher_tokenizer) and the teacher's special token ids)."
        )


def check_model_vocab(model: nn.Module, tokenizer: Any, role: str) -> None:
    """Raise ModelError if `model` cannot embed/predict every id `tokenizer` can produce.

    role: 'teacher' or 'student', used in the message."""
    n_tok = len(tokenizer)
    rows = {"input embedding": model.get_input_embeddings().weight.shape[0]}
    output = model.get_output_embeddings()
    if output is not None:
        rows["output (lm_head)"] = output.weight.shape[0]
    for what, n_rows in rows.items():
        if n_rows < n_tok:
            raise ModelError(
                f"{role} model's {what} has {n_rows} rows but its tokenizer has {n_tok} tokens: "
                f"ids >= {n_rows} would be out of range. Fix: use the tokenizer the {role} was trained "
                "with, or call model.resize_token_embeddings(len(tokenizer)) (the new rows then need "
                "training)."
            )


def own_tokenizer(name_or_path: str) -> Any | None:
    """The tokenizer shipped beside a checkpoint (local directory or locally cached hub id), or None."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_models_share_tokenizer(
    config: Any, tokenizer: Any, roles: tuple[str, ...] = ("teacher", "student")
) -> None:
    """Before any work: the teacher's and the student's own tokenizers (when their checkpoints ship one)
    must equal the tokenizer the pipeline tokenises with (`tokenizer.path`, or the demo tokenizer).

    A model built from config has no tokenizer of its own: it is sized from this tokenizer by construction.
    The student side passes roles=("student",): it never opens the teacher's checkpoint.
    """
    for role in roles:
        model_cfg = getattr(config, role)
        source = model_cfg.path or model_cfg.upcycle_from
        if source is None:
            continue
        theirs = own_tokenizer(source)
        if theirs is None:
            continue
        problems = vocabulary_differences(tokenizer, theirs, names=("pipeline", role))
        if problems:
            raise ModelError(
                f"the {role} checkpoint {source!r} ships a tokenizer that differs from the one the pipeline "
                f"tokenises with ({getattr(tokenizer, 'name_or_path', '') or 'tokenizer.path'}): "
                + "; ".join(problems)
                + f". Teacher logits can only supervise a student over the same token ids. Fix: set "
                f"tokenizer.path to the {role}'s tokenizer if it is the right one for both models, or pick "
                f"a {role} of the other model's tokenizer family."
            )
