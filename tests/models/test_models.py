"""pipeline.models: tiny real transformers models (built from configs, never downloaded)."""

from __future__ import annotations

import pytest
import torch
from support.tiny import padded_batch, tiny_arch, tiny_moe
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3MoeConfig,
)

from pipeline.errors import ConfigError, ModelError
from pipeline.models.adapter import SUPPORTED_MODEL_TYPES, MoEAdapter, MoEForwardOutput
from pipeline.models.build import TinyMoEConfig, build_tiny_moe, count_parameters, load_causal_lm
from pipeline.models.compat import check_model_vocab, check_same_vocabulary
from pipeline.models.upcycle import upcycle_dense_to_moe

VOCAB = 96
# Large init so every term is O(1): a 1e-5 tolerance then really tests the math, not tiny numbers.
INIT = 0.2
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    initializer_range=INIT,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _from_config(config) -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _qwen3_moe() -> PreTrainedModel:
    arch = tiny_arch(
        num_layers=3,
        num_experts=6,
        moe_intermediate_size=24,
        max_position_embeddings=256,
        initializer_range=INIT,
    )
    return tiny_moe(arch, vocab_size=VOCAB, seed=0)


def _mixtral() -> PreTrainedModel:
    return _from_config(
        MixtralConfig(**SMALL, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2)
    )


def _olmoe() -> PreTrainedModel:  # norm_topk_prob=False: the un-normalised top-k path
    return _from_config(OlmoeConfig(**SMALL, intermediate_size=24, num_experts=4, num_experts_per_tok=2))


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return padded_batch(VOCAB, seed)


def _hooks_left(adapter: MoEAdapter) -> int:
    blocks = [adapter.moe_block(i) for i in range(adapter.num_layers)]
    return sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in blocks)


@pytest.mark.parametrize("make", [_qwen3_moe, _mixtral, _olmoe], ids=["qwen3_moe", "mixtral", "olmoe"])
def test_expert_outputs_reproduce_moe_block(make) -> None:
    model = make()
    adapter = MoEAdapter(model)
    input_ids, attention_mask, token_mask = _batch()
    layers = list(range(adapter.num_layers))
    block_out: dict[int, torch.Tensor] = {}
    handles = [
        adapter.moe_block(i).register_forward_hook(lambda _m, _a, out, i=i: block_out.__setitem__(i, out))
        for i in layers
    ]
    try:
        out = adapter.forward_with_experts(input_ids, attention_mask, layers, token_mask)
    finally:
        for h in handles:
            h.remove()

    n = int(token_mask.sum())
    assert isinstance(out, MoEForwardOutput)
    assert out.logits.shape == (2, 9, adapter.vocab_size)
    torch.testing.assert_close(out.logits, model(input_ids=input_ids, attention_mask=attention_mask).logits)
    for i in layers:
        probs, experts = out.router_probs[i], out.expert_outputs[i]
        assert probs.shape == (n, adapter.num_experts) and probs.dtype == torch.float32
        assert experts.shape == (n, adapter.num_experts, adapter.hidden_size)
        torch.testing.assert_close(probs.sum(-1), torch.ones(n))
        weights, idx = adapter.route(probs)
        chosen = experts.gather(1, idx[..., None].expand(-1, -1, adapter.hidden_size))
        combined = (chosen * weights[..., None]).sum(1)
        expected = block_out[i][token_mask]  # row-major (b, t) order
        assert expected.abs().mean() > 1e-2  # a meaningful comparison, not of near-zero numbers
        torch.testing.assert_close(combined, expected, atol=1e-5, rtol=1e-5)
    assert _hooks_left(adapter) == 0


def test_adapter_properties() -> None:
    q, m, o = MoEAdapter(_qwen3_moe()), MoEAdapter(_mixtral()), MoEAdapter(_olmoe())
    assert (q.num_layers, q.num_experts, q.top_k, q.hidden_size, q.vocab_size) == (3, 6, 2, 32, VOCAB)
    assert q.norm_topk_prob and m.norm_topk_prob and not o.norm_topk_prob
    assert (m.num_experts, m.expert_intermediate_size) == (5, 24)
    assert q.moe_block(2) is q.model.model.layers[2].mlp
    with pytest.raises(ModelError, match="out of range"):
        q.moe_block(3)


def test_forward_with_experts_subset_of_layers_and_hooks_removed_on_error() -> None:
    adapter = MoEAdapter(_qwen3_moe())
    input_ids, attention_mask, token_mask = _batch()
    out = adapter.forward_with_experts(input_ids, attention_mask, [2], token_mask)
    assert set(out.router_probs) == set(out.expert_outputs) == {2}
    bad_ids = input_ids.clone()
    bad_ids[0, 0] = VOCAB + 5  # embedding lookup fails inside the forward
    with pytest.raises(IndexError):
        adapter.forward_with_experts(bad_ids, attention_mask, [0, 1], token_mask)
    assert _hooks_left(adapter) == 0
    with pytest.raises(ModelError, match="token_mask"):
        adapter.forward_with_experts(input_ids, attention_mask, [0], token_mask[:, :3])


def test_gradients_flow_into_experts_router_and_trunk() -> None:
    model = _qwen3_moe().train()
    adapter = MoEAdapter(model)
    input_ids, attention_mask, token_mask = _batch()
    out = adapter.forward_with_experts(input_ids, attention_mask, [1], token_mask)
    g = torch.Generator().manual_seed(1)
    loss = (out.expert_outputs[1] * torch.randn(out.expert_outputs[1].shape, generator=g)).sum()
    loss = loss + (out.router_probs[1] * torch.randn(out.router_probs[1].shape, generator=g)).sum()
    loss.backward()
    block = adapter.moe_block(1)
    for name, param in [
        ("gate", block.gate.weight),
        ("gate_up_proj", block.experts.gate_up_proj),
        ("down_proj", block.experts.down_proj),
        ("layer0 attention", model.model.layers[0].self_attn.q_proj.weight),
    ]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert block.experts.gate_up_proj.grad.abs().sum(dim=(1, 2)).gt(0).all()  # every expert, not just top-k


@pytest.mark.parametrize(
    "make",
    [
        lambda: _from_config(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64)),
        lambda: _from_config(LlamaConfig(**SMALL, intermediate_size=24)),
        lambda: _qwen3_moe().model,  # the MoE trunk without its LM head
    ],
    ids=["gpt2", "dense-llama", "moe-without-lm-head"],
)
def test_unsupported_architecture(make) -> None:
    with pytest.raises(ModelError, match="supported type: " + ", ".join(SUPPORTED_MODEL_TYPES)):
        MoEAdapter(make())


def test_dense_layers_are_skipped_and_moe_layers_counted() -> None:
    model = _from_config(
        Qwen3MoeConfig(
            **{**SMALL, "num_hidden_layers": 3},
            intermediate_size=24,
            moe_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
        )
    )
    adapter = MoEAdapter(model)  # layer indices count MoE layers: 0 -> decoder layer 0, 1 -> decoder layer 2
    assert (adapter.num_layers, adapter.moe_layers) == (2, (0, 2))
    assert adapter.moe_block(1) is model.model.layers[2].mlp


def test_build_tiny_moe_is_deterministic_and_configured() -> None:
    cfg = TinyMoEConfig()
    a = build_tiny_moe(cfg, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, seed=3)
    b = build_tiny_moe(cfg, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, seed=3)
    c = build_tiny_moe(cfg, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].mlp.gate.weight, c.model.layers[0].mlp.gate.weight)
    assert a.config.model_type == "qwen3_moe" and not a.config.output_router_logits
    assert a.config.num_experts == cfg.num_experts and a.config.norm_topk_prob
    assert a.model.embed_tokens.weight is a.lm_head.weight  # tied by default
    expected = (
        VOCAB * cfg.hidden_size
        + cfg.hidden_size  # tied embedding + final norm
        + cfg.num_layers
        * (
            cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q,k,v,o
            + 2 * cfg.head_dim
            + 2 * cfg.hidden_size  # q/k norms, two layer norms
            + cfg.num_experts * cfg.hidden_size  # router
            + cfg.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size
        )
    )  # experts
    assert count_parameters(a) == expected
    with pytest.raises(ConfigError, match="top_k"):
        TinyMoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="eos_token_id"):
        build_tiny_moe(cfg, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=VOCAB, seed=0)


def test_save_and_load_round_trip(tmp_path) -> None:
    model = _qwen3_moe()
    model.save_pretrained(tmp_path / "m")
    loaded = load_causal_lm(str(tmp_path / "m"))
    input_ids, attention_mask, _ = _batch()
    torch.testing.assert_close(
        loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
        model(input_ids=input_ids, attention_mask=attention_mask).logits,
    )
    assert load_causal_lm(str(tmp_path / "m"), torch_dtype="bfloat16").dtype == torch.bfloat16


def test_load_causal_lm_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="check the path"):
        load_causal_lm(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a loadable checkpoint"):
        load_causal_lm(str(tmp_path / "empty"))
    # conftest sets HF_HUB_OFFLINE=1: fails fast, no network, naming the fix
    with pytest.raises(ModelError, match=r"HF_HUB_OFFLINE is set .* Fix: download it"):
        load_causal_lm("no-such-org/no-such-model")


def _dense_qwen3() -> PreTrainedModel:
    return _from_config(Qwen3Config(**SMALL, intermediate_size=48))


def _dense_llama() -> PreTrainedModel:
    return _from_config(
        LlamaConfig(
            **{k: v for k, v in SMALL.items() if k != "head_dim"},
            intermediate_size=48,
            tie_word_embeddings=True,
        )
    )


@pytest.mark.parametrize(
    ("make", "moe_type"), [(_dense_qwen3, "qwen3_moe"), (_dense_llama, "mixtral")], ids=["qwen3", "llama"]
)
def test_upcycle_reproduces_dense_logits(make, moe_type, tmp_path) -> None:
    dense = make()
    input_ids, attention_mask, token_mask = _batch()
    dense_logits = dense(input_ids=input_ids, attention_mask=attention_mask).logits
    moe = upcycle_dense_to_moe(dense, num_experts=4, top_k=2)
    assert moe.config.model_type == moe_type
    adapter = MoEAdapter(moe)  # the upcycled model is a supported MoE
    assert (adapter.num_experts, adapter.top_k, adapter.norm_topk_prob) == (4, 2, True)
    assert moe.config.tie_word_embeddings == dense.config.tie_word_embeddings
    if dense.config.tie_word_embeddings:
        assert moe.lm_head.weight is moe.model.embed_tokens.weight
    torch.testing.assert_close(
        moe(input_ids=input_ids, attention_mask=attention_mask).logits, dense_logits, atol=1e-5, rtol=1e-5
    )
    # the router is fresh (non-degenerate) while every expert equals the dense MLP
    block = adapter.moe_block(0)
    assert block.gate.weight.std() > 0
    torch.testing.assert_close(block.experts.down_proj[3], dense.model.layers[0].mlp.down_proj.weight)
    experts = adapter.forward_with_experts(input_ids, attention_mask, [1], token_mask).expert_outputs[1]
    torch.testing.assert_close(experts, experts[:, :1].expand_as(experts))  # all experts compute the same

    noisy = upcycle_dense_to_moe(dense, num_experts=4, top_k=2, noise_std=0.05, seed=1)
    noisy_logits = noisy(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (noisy_logits - dense_logits).abs().max() > 1e-3  # the MLP path matters, so the test above is real
    again = upcycle_dense_to_moe(dense, num_experts=4, top_k=2, noise_std=0.05, seed=1)
    assert torch.equal(again(input_ids=input_ids).logits, noisy(input_ids=input_ids).logits)

    # from a path (the memory-saving branch that frees dense tensors), and save_pretrained-able
    dense.save_pretrained(tmp_path / "dense")
    from_path = upcycle_dense_to_moe(str(tmp_path / "dense"), num_experts=4, top_k=2)
    from_path.save_pretrained(tmp_path / "moe")
    reloaded = load_causal_lm(str(tmp_path / "moe"))
    torch.testing.assert_close(
        reloaded(input_ids=input_ids, attention_mask=attention_mask).logits,
        dense_logits,
        atol=1e-5,
        rtol=1e-5,
    )


def test_upcycle_rejects_unsupported() -> None:
    with pytest.raises(ModelError, match="qwen3 -> qwen3_moe"):
        upcycle_dense_to_moe(_qwen3_moe(), num_experts=4, top_k=2)
    with pytest.raises(ModelError, match="top_k"):
        upcycle_dense_to_moe(_dense_qwen3(), num_experts=2, top_k=3)
    biased = _from_config(
        LlamaConfig(
            **{k: v for k, v in SMALL.items() if k != "head_dim"}, intermediate_size=48, mlp_bias=True
        )
    )
    with pytest.raises(ModelError, match="bias"):
        upcycle_dense_to_moe(biased, num_experts=2, top_k=1)


def _tokenizer(words: list[str], eos: str = "</s>") -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token=eos, unk_token="<unk>"
    )


def test_check_same_vocabulary() -> None:
    teacher = _tokenizer(["a", "b", "c"])
    check_same_vocabulary(teacher, _tokenizer(["a", "b", "c"]))
    with pytest.raises(ModelError, match=r"id 5 is 'b' \(teacher\) vs 'x' \(student\).*teacher's tokenizer"):
        check_same_vocabulary(teacher, _tokenizer(["a", "x", "c"]))
    with pytest.raises(ModelError, match=r"vocabulary size 7 \(teacher\) vs 8 \(student\)"):
        check_same_vocabulary(teacher, _tokenizer(["a", "b", "c", "d"]))
    with pytest.raises(ModelError, match=r"eos_token_id 2 \(teacher\) vs 4 \(student\)"):
        check_same_vocabulary(teacher, _tokenizer(["a", "b", "c"], eos="a"))


def test_check_model_vocab() -> None:
    tokenizer = _tokenizer([f"w{i}" for i in range(VOCAB - 4)])
    check_model_vocab(_qwen3_moe(), tokenizer, role="student")
    small = tiny_moe(TinyMoEConfig(), vocab_size=VOCAB - 10, seed=0)  # the class's default architecture
    with pytest.raises(
        ModelError, match=f"student model's input embedding has {VOCAB - 10} rows.*{VOCAB} tokens"
    ):
        check_model_vocab(small, tokenizer, role="student")
