"""The prompt template: the Alpaca/Dolly template that MiniLLM, DistiLLM and B-Distill evaluate with.

A record with a context renders as

    Below is an instruction that describes a task, paired with an input that provides further context.
    Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {context}

    ### Response:

(the first two lines are one line in the real string) and one without a context drops the "paired with an
input" clause and the "### Input:" section. The prompt ends with "### Response:\\n": the response follows
directly, so a generation starts right after it. The template is part of the teacher-cache key
(TEMPLATE_SPEC): changing it invalidates caches, as it must.
"""

from __future__ import annotations

from pipeline.data.records import Record

PROMPT_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
PROMPT_NO_CONTEXT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Everything that determines a rendered prompt, in one string: hash it into cache keys.
TEMPLATE_SPEC = "dolly-v1\n" + PROMPT_WITH_CONTEXT + "\n" + PROMPT_NO_CONTEXT


def format_prompt(record: Record) -> str:
    """Render the prompt (everything before the response) for `record`.

    A whitespace-only context counts as no context. Fields are inserted verbatim (no str.format on user
    text, so braces in instructions are safe).
    """
    if record.context.strip():
        head, rest = PROMPT_WITH_CONTEXT.split("{instruction}")
        middle, tail = rest.split("{context}")
        return head + record.instruction + middle + record.context + tail
    head, tail = PROMPT_NO_CONTEXT.split("{instruction}")
    return head + record.instruction + tail
