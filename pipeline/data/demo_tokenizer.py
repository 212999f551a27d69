"""A small byte-level BPE tokenizer trained on the demo data (no hub download, deterministic).

Special tokens get fixed ids: <pad>=0, <s>=1, </s>=2, <unk>=3. Like Llama's, the tokenizer prepends <s>
when special tokens are added (so `pipeline.data.tokenize` starts sequences with bos) and never adds </s>
itself (the tokenisation code appends eos after the response). Byte-level BPE never produces <unk>; it
is there because model configs and generation code expect one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.data.records import Record
from pipeline.data.template import format_prompt
from pipeline.errors import ConfigError, DataError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS


def train_demo_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, save it to `out_dir` (AutoTokenizer-loadable) and return it.

    The same texts in the same order give the same tokenizer.json: the BPE trainer breaks count ties by
    token ids, and the byte alphabet is fixed, so no hash order leaks in.
    """
    min_size = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus specials
    if vocab_size < min_size:
        raise ConfigError(f"vocab_size must be >= {min_size} for a byte-level BPE, got {vocab_size}.")
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("train_demo_tokenizer got no text. Fix: pass the dataset's prompts and responses.")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return wrapped


def record_texts(records: Iterable[Record]) -> Iterator[str]:
    """The training text of each record: the rendered prompt followed by the response."""
    for r in records:
        yield format_prompt(r) + r.response
