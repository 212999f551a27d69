"""Batched generation and validation loss for one model on one process (CPU or GPUs).

The evaluation stage's actors, the fine-tuning stage's before/after figures and the cache stage's teacher
responses (SeqKD) all generate through `generate_token_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.data.collate import pad_batch
from pipeline.data.records import Record
from pipeline.data.tokenize import tokenize_prompt


@torch.no_grad()
def generate_token_ids(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[int]]:
    """The one generator: left-padded batched `model.generate` over token-id prompts -> new token ids.

    Sampling is pure temperature/top-p sampling (top-k off: transformers' default top_k=50 would silently
    truncate the distribution), reproducible per (seed, batch start) and without touching the caller's RNG.
    Inputs go to the input embedding's device (the first GPU of a device_map model)."""
    model.eval()
    device = model.get_input_embeddings().weight.device
    # fork_rng over every GPU the model uses: sampling draws on the output embedding's device.
    cuda_ids = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(chunk):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p) :] = 1
        with torch.random.fork_rng(devices=cuda_ids):
            torch.manual_seed(seed + start)
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=not greedy,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                **sampling,
            )
        outputs += [[int(t) for t in row] for row in generated[:, width:].tolist()]
    return outputs


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
    """Decoded responses (special tokens stripped) to the records' prompts (`generate_token_ids`)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = generate_token_ids(
        model,
        [tokenize_prompt(tokenizer, r) for r in records],
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
        eos_id=tokenizer.eos_token_id,
        greedy=greedy,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
    )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


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
