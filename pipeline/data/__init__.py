"""Instruction data: records -> prompt template -> tokenised examples with response masks -> batches.

records.py       Record, load_records (JSONL / `datasets`), write_jsonl, records_fingerprint
template.py      format_prompt and the template text (part of the teacher-cache key)
tokenize.py      tokenize_record(s), tokenize_prompt: exact response masks, too-long examples dropped
split.py         split_records: deterministic train/validation/test
collate.py       pad_batch, distill_positions (docs/cache-format.md)
demo_dataset.py  generate_demo_records: the generated, license-clean demo dataset
answers.py       AnswerKey: what a correct response to a generated record is (a sidecar, never in the JSONL)
demo_eval_sets.py the held-out demo test sets (paraphrase, composition, entities) and the test split's keys
demo_tokenizer.py train_demo_tokenizer: byte-level BPE for the demo

Submodules are imported explicitly (nothing is re-exported here) so that importing one of them in a Ray
worker does not pull in torch/transformers/datasets when it does not need them.
"""
