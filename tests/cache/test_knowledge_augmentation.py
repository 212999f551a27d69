"""Knowledge Augmentation in the cache (pipeline.cache.build.augment): R = 1, p = 0 is the plain cache;
otherwise the stored distribution is the seeded average of stochastic-routing teacher forwards, and in
the key."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from support.paths import TINY
from support.tiny import teacher_assets, teacher_cache_spec, tiny_arch

from pipeline.cache import CacheRuntime, build_teacher_cache
from pipeline.cache.build.augment import augmented_targets, routing_seed, stochastic_routing
from pipeline.cache.build.teacher import TeacherOutputSpec, compute_shard, teacher_targets
from pipeline.cache.format.key import key_inputs
from pipeline.cache.format.spec import KnowledgeAugmentation
from pipeline.data.collate import pad_batch
from pipeline.data.tokenize import tokenize_records
from pipeline.errors import ConfigError
from pipeline.models.adapter import MoEAdapter

LAYERS, WIDTH, K = (0, 1), 4, 8


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ka")
    a = teacher_assets(root, 6, records_seed=2, vocab_size=320, arch=tiny_arch(num_layers=2), model_seed=4)
    spec = teacher_cache_spec(
        a,
        cached_layers=LAYERS,
        width=WIDTH,
        logits_k=K,
        states_dtype="float16",
        max_length=256,
    )
    examples, _ = tokenize_records(a.tok, a.records, 256)
    return {"root": root, "records": a.records, "model": a.model.eval(), "spec": spec, "examples": examples,
            "pad": a.tok.pad_token_id}  # fmt: skip


def _shard(t: dict[str, Any], ka: KnowledgeAugmentation) -> dict[str, np.ndarray]:
    out = dataclasses.replace(TeacherOutputSpec.from_spec(t["spec"], WIDTH), augmentation=ka)
    return compute_shard(
        MoEAdapter(t["model"]), t["examples"], 0, len(t["examples"]), out, 3, t["pad"]
    ).arrays


def test_plain_augmentation_is_the_plain_cache(teacher: dict[str, Any]) -> None:
    plain, ka = (
        teacher["spec"],
        dataclasses.replace(teacher["spec"], knowledge_augmentation=KnowledgeAugmentation(1, 0.0)),
    )
    records = teacher["records"]
    assert key_inputs(ka, records, WIDTH) == key_inputs(plain, records, WIDTH)
    runtime = CacheRuntime(batch_size=3, rows_per_shard=3, executor="local", progress=False)
    root = str(teacher["root"] / "caches")
    assert build_teacher_cache(plain, records, root, runtime).status == "built"
    assert build_teacher_cache(ka, records, root, runtime).status == "exists"  # the same store
    a, b = _shard(teacher, KnowledgeAugmentation()), _shard(teacher, KnowledgeAugmentation(1, 0.0))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    # and p = 0 routing hooks change nothing: forced through the averaging path it is the plain forward
    adapter = MoEAdapter(teacher["model"])
    batch = pad_batch(teacher["examples"][:3], teacher["pad"])
    out = TeacherOutputSpec.from_spec(teacher["spec"], WIDTH)
    ref = teacher_targets(adapter, batch, out)
    avg = augmented_targets(
        lambda: teacher_targets(adapter, batch, out), adapter, KnowledgeAugmentation(2, 0.0), [0, 1, 2]
    )
    torch.testing.assert_close(avg["logits"], torch.log_softmax(ref["logits"], dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(avg["gates"], ref["gates"], atol=1e-6, rtol=0)


def test_stochastic_routing_samples_experts_with_router_weights(teacher: dict[str, Any]) -> None:
    adapter = MoEAdapter(teacher["model"])
    gate = adapter.moe_block(0).gate
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    _, _, top_idx = gate(x)
    with stochastic_routing(adapter, 1.0, seed=7):
        logits, scores, idx = gate(x)
    probs = torch.softmax(logits.float(), dim=-1)
    assert not torch.equal(idx, top_idx)  # p = 1: sampled, not the top-k
    assert all(len(set(row.tolist())) == adapter.top_k for row in idx)  # without replacement
    expected = probs.gather(1, idx)
    if adapter.norm_topk_prob:
        expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(scores.float(), expected, atol=1e-6, rtol=0)
    assert gate._forward_hooks == {}  # removed on exit
    with stochastic_routing(adapter, 1.0, seed=7):
        assert torch.equal(gate(x)[2], idx)  # seeded


def test_augmented_cache_is_an_average_in_its_key(teacher: dict[str, Any]) -> None:
    ka = KnowledgeAugmentation(3, 0.5)
    spec = dataclasses.replace(teacher["spec"], knowledge_augmentation=ka)
    inputs = key_inputs(spec, teacher["records"], WIDTH)
    assert inputs["knowledge_augmentation"] == {"repeats": 3, "sampling_prob": 0.5}
    assert inputs != key_inputs(teacher["spec"], teacher["records"], WIDTH)
    plain, aug, again = _shard(teacher, KnowledgeAugmentation()), _shard(teacher, ka), _shard(teacher, ka)
    for name in aug:
        np.testing.assert_array_equal(aug[name], again[name])  # seeded: a rebuild is identical
    assert not np.array_equal(aug["logit_values"], plain["logit_values"])
    mass = np.logaddexp.reduce(
        np.concatenate([aug["logit_values"].astype(np.float64), aug["logit_tail_logmass"][:, None]], 1),
        axis=1,
    )
    np.testing.assert_allclose(mass, 0.0, atol=2e-3)  # a distribution (fp16 storage rounding)
    # the average of R forwards, each a full distribution: the mean of R=1 runs with the same seeds
    adapter = MoEAdapter(teacher["model"])
    batch = pad_batch(teacher["examples"][:3], teacher["pad"])
    out = TeacherOutputSpec.from_spec(teacher["spec"], WIDTH)
    avg = augmented_targets(lambda: teacher_targets(adapter, batch, out), adapter, ka, [0, 1, 2])
    singles = []
    for r in range(3):
        with stochastic_routing(adapter, 0.5, routing_seed([0, 1, 2], r)):
            singles.append(torch.softmax(teacher_targets(adapter, batch, out)["logits"], dim=-1))
    torch.testing.assert_close(avg["logits"].exp(), torch.stack(singles).mean(0), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="repeats"):
        dataclasses.replace(teacher["spec"], knowledge_augmentation=KnowledgeAugmentation(0, 0.1))


def test_config_option_reaches_the_spec_and_the_config_hash(teacher: dict[str, Any]) -> None:

    from pipeline.cache.stage import cache_spec_from_config
    from pipeline.config import load_config, teacher_cache_hash, with_overrides

    base = load_config(TINY)
    ka = with_overrides(base, {"cache.knowledge_augmentation": {"repeats": 2, "sampling_prob": 0.3}})
    plain = with_overrides(base, {"cache.knowledge_augmentation": {"repeats": 1, "sampling_prob": 0}})
    assert teacher_cache_hash(plain) == teacher_cache_hash(base) != teacher_cache_hash(ka)
    spec = cache_spec_from_config(ka, teacher["spec"].teacher_path, teacher["spec"].tokenizer_path)
    assert spec.knowledge_augmentation == KnowledgeAugmentation(2, 0.3)
    bad = with_overrides(base, {"cache.knowledge_augmentation.sampling_prob": 1.5})
    with pytest.raises(ConfigError, match="sampling_prob"):
        cache_spec_from_config(bad, teacher["spec"].teacher_path, teacher["spec"].tokenizer_path)
