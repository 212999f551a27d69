"""Batched generation and validation loss for one model on one process (CPU or one GPU).

The Ray Data evaluation stage runs these inside its actor pool; the fine-tuning stage calls them directly
for its before/after figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.data.collate import pad_batch
from pipeline.data.records import Record
from pipeline.data.tokenize import tokenize_prompt


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    records: Sequence[Record],
    *,
    max_new_tokens: int = 48,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """Left-padded batched `model.generate`; returns decoded responses (special tokens stripped)."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    generator_seed = seed
    for start in range(0, len(records), batch_size):
        prompts = [tokenize_prompt(tokenizer, r) for r in records[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        torch.manual_seed(generator_seed + start)  # sampling is reproducible per seed and batch
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=temperature if not greedy else None,
            top_p=top_p if not greedy else None,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs


@torch.no_grad()
def validation_loss(model, examples: Sequence[dict], pad_id: int, batch_size: int = 32) -> float:
    """Mean cross-entropy per response token over tokenised examples."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start : start + batch_size], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits.float()
        labels = batch["labels"][:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            reduction="sum",
            ignore_index=-100,
        )
        total += float(loss)
        count += int((labels != -100).sum())
    return total / max(count, 1)
