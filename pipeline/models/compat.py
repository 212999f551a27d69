"""Teacher/student compatibility checks: token-level KD compares distributions over the SAME token ids."""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.errors import ModelError

_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id")


def _id_to_token(tokenizer: Any) -> dict[int, str]:
    return {int(i): tok for tok, i in tokenizer.get_vocab().items()}


def check_same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Raise ModelError unless both tokenizers map the same strings to the same ids, same special tokens."""
    problems: list[str] = []
    n_t, n_s = len(teacher_tokenizer), len(student_tokenizer)
    if n_t != n_s:
        problems.append(f"vocabulary size {n_t} (teacher) vs {n_s} (student)")
    vocab_t, vocab_s = _id_to_token(teacher_tokenizer), _id_to_token(student_tokenizer)
    for i in sorted(vocab_t.keys() | vocab_s.keys()):
        if vocab_t.get(i) != vocab_s.get(i):
            problems.append(
                f"first differing token: id {i} is {vocab_t.get(i)!r} (teacher) "
                f"vs {vocab_s.get(i)!r} (student)"
            )
            break
    for attr in _SPECIAL_IDS:
        a, b = getattr(teacher_tokenizer, attr, None), getattr(student_tokenizer, attr, None)
        if a != b:
            problems.append(f"{attr} {a} (teacher) vs {b} (student)")
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
