"""Every MoE family the adapter reads (docs/model-families.md), on tiny random fp32 models built from each
family's config class: the adapter's per-expert outputs recombined with the model's own top-k weights (plus
the shared term) equal the model's MoE block output; its router distribution p agrees with the model's
routing; its MoE layers are the ones the config names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.families import FAMILY_TYPES, family_config, family_model
from support.tiny import padded_batch, tiny_config, write_config
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, Qwen3MoeConfig

from pipeline.cache.build.builder import teacher_dims
from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.models.adapter import MoEAdapter
from pipeline.models.dims import dims_from_config
from pipeline.models.families import SUPPORTED_MODEL_TYPES

VOCAB = 96


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return padded_batch(VOCAB, seed)


def _block_io(adapter: MoEAdapter, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[dict, dict]:
    """Each MoE block's input and output rows at `mask`, from a plain forward of the model."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def keep(store: dict, i: int, value: torch.Tensor) -> None:
        value = value[0] if isinstance(value, tuple) else value  # gpt-oss, Llama 4: (output, router data)
        store[i] = value.reshape(*mask.shape, -1)[mask]  # Llama 4's block returns [B * T, H]

    handles = []
    for i in range(adapter.num_layers):
        block = adapter.moe_block(i)
        handles.append(block.register_forward_pre_hook(lambda _m, a, i=i: keep(inputs, i, a[0])))
        handles.append(block.register_forward_hook(lambda _m, _a, out, i=i: keep(outputs, i, out)))
    try:
        with torch.no_grad():
            adapter.model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


def test_every_listed_family_is_in_the_table() -> None:
    assert set(FAMILY_TYPES) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_expert_outputs_rebuild_the_block_output(model_type: str) -> None:
    model = family_model(model_type)
    adapter = MoEAdapter(model)
    input_ids, _, token_mask = _batch()
    inputs, outputs = _block_io(adapter, input_ids, token_mask)
    layers = list(range(adapter.num_layers))
    with torch.no_grad():
        fwd = adapter.forward_with_experts(input_ids, None, layers, token_mask)
        gates_only = adapter.forward_with_experts(input_ids, None, layers, token_mask, with_experts=False)
    assert gates_only.expert_outputs == {}
    n = int(token_mask.sum())
    for i in layers:
        view, x = adapter.block_view(i), inputs[i]
        probs, experts = fwd.router_probs[i], fwd.expert_outputs[i]
        assert probs.shape == (n, adapter.num_experts) and probs.dtype == torch.float32
        assert experts.shape == (n, adapter.num_experts, adapter.hidden_size)
        torch.testing.assert_close(probs.sum(-1), torch.ones(n))
        with torch.no_grad():
            routing, shared = view.routing(x), view.shared_output(x)
            expected = outputs[i]
            if view.family.layer_shared:  # Granite's shared MLP sits on the decoder layer, beside the block
                expected = expected + getattr(view.layer, view.family.layer_shared)(x)
        assert expected.abs().mean() > 1e-2  # a meaningful comparison, not of near-zero numbers
        torch.testing.assert_close(view.combine(experts, routing, shared), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(routing.probs, probs)
        torch.testing.assert_close(gates_only.router_probs[i], probs)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_router_distribution_agrees_with_the_model_routing(model_type: str) -> None:
    """The model's top-k weights are p on its chosen experts, renormalised iff the model renormalises,
    times routed_scaling_factor; Llama 4 (top-1, input-scaled) picks p's argmax and scales by sigmoid."""
    adapter = MoEAdapter(family_model(model_type))
    input_ids, _, token_mask = _batch()
    inputs, _ = _block_io(adapter, input_ids, token_mask)
    config = adapter.model.config
    for i in range(adapter.num_layers):
        view = adapter.block_view(i)
        with torch.no_grad():
            r = view.routing(inputs[i])
        chosen = r.probs.gather(1, r.indices)
        if view.family.combine == "input":
            assert torch.equal(r.indices[:, 0], r.probs.argmax(-1)) and torch.all(r.weights == 1)
            continue
        if view.renormalize:
            chosen = chosen / chosen.sum(-1, keepdim=True)
        expected = chosen * getattr(config, "routed_scaling_factor", 1.0)
        torch.testing.assert_close(r.weights.float(), expected, atol=1e-5, rtol=1e-5)
        if view.family.softmax_topk_router:  # the old probs -> top-k rule is the model's for these
            _, indices = adapter.route(r.probs)
            assert torch.equal(indices.sort(-1).values, r.indices.sort(-1).values)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_moe_layers_are_the_configs(model_type: str) -> None:
    config = family_config(model_type)
    adapter = MoEAdapter(family_model(model_type))
    dims = dims_from_config(config.to_dict(), model_type)
    assert adapter.moe_layers == (dims.moe_layers or tuple(range(config.num_hidden_layers)))
    assert (dims.num_layers, dims.num_experts) == (adapter.num_layers, adapter.num_experts)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "olmoe"])
def test_gates_only_forward_is_the_old_router_logits_softmax_bitwise(model_type: str) -> None:
    """Baselines' gate metrics (with_experts=False) stay bit-identical for the families read before."""
    model = family_model(model_type, layers=2)
    input_ids, attention_mask, token_mask = _batch()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        fwd = MoEAdapter(model).forward_with_experts(
            input_ids, attention_mask, [0, 1], token_mask, with_experts=False
        )
    for i in (0, 1):
        old = torch.softmax(out.router_logits[i].float(), dim=-1)[token_mask.reshape(-1)]
        assert torch.equal(fwd.router_probs[i], old)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "olmoe"])
def test_old_families_read_bit_identically(model_type: str) -> None:
    """p and every expert's output for the families read before are the former formulas, bit for bit."""
    adapter = MoEAdapter(family_model(model_type, layers=2))
    x = torch.randn(10, adapter.hidden_size, generator=torch.Generator().manual_seed(2))
    for i in range(adapter.num_layers):
        block = adapter.moe_block(i)
        with torch.no_grad():
            old_probs = torch.softmax(torch.nn.functional.linear(x, block.gate.weight).float(), dim=-1)
            gate, up = torch.einsum("nh,eoh->neo", x, block.experts.gate_up_proj).chunk(2, dim=-1)
            hidden = block.experts.act_fn(gate) * up
            old_experts = torch.einsum("nei,ehi->neh", hidden, block.experts.down_proj)
            assert torch.equal(adapter.router_probs(i, x), old_probs)
            assert torch.equal(adapter.expert_outputs(i, x), old_experts)


def test_families_with_dense_layers_index_moe_layers() -> None:
    for model_type, moe_layers in [("deepseek_v3", (1, 2)), ("qwen2_moe", (1, 2)), ("llama4_text", (1,))]:
        adapter = MoEAdapter(family_model(model_type))
        assert adapter.moe_layers == moe_layers, model_type
        assert adapter.moe_block(0) is getattr(
            adapter.model.model.layers[moe_layers[0]], adapter.block_view(0).family.block
        )


def test_selection_bias_changes_the_choice_not_p() -> None:
    """DeepSeek-V3's e_score_correction_bias moves the model's choice, not p (normalised sigmoid scores)."""
    adapter = MoEAdapter(family_model("deepseek_v3"))
    x = torch.randn(64, adapter.hidden_size, generator=torch.Generator().manual_seed(1))
    router = adapter.block_view(0).router
    with torch.no_grad():
        before = adapter.routing(0, x)
        router.e_score_correction_bias.add_(torch.linspace(-1.0, 1.0, adapter.num_experts))
        after = adapter.routing(0, x)
    torch.testing.assert_close(before.probs, after.probs)
    assert not torch.equal(before.indices.sort(-1).values, after.indices.sort(-1).values)


def test_a_family_outside_the_table_is_read_when_its_structure_is_the_default() -> None:
    """cohere2_moe has no entry: it is read with the default one, checked numerically on construction."""
    config = CONFIG_MAPPING["cohere2_moe"](
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, intermediate_size=24,
    )  # fmt: skip
    torch.manual_seed(0)
    adapter = MoEAdapter(AutoModelForCausalLM.from_config(config).eval())
    input_ids, _, token_mask = _batch()
    inputs, outputs = _block_io(adapter, input_ids, token_mask)
    for i in range(adapter.num_layers):
        view = adapter.block_view(i)
        with torch.no_grad():
            rebuilt = view.combine(view.expert_outputs(inputs[i]), view.routing(inputs[i]), None)
        torch.testing.assert_close(rebuilt, outputs[i], atol=1e-5, rtol=1e-5)


def test_unreadable_family_refused_from_its_config(tmp_path: Path) -> None:
    """Before any work, from config.json: a family outside the table whose block the default entry cannot
    express names what is missing; a multimodal wrapper names its text model; a known family with dense
    layers records its MoE layers' decoder indices."""
    CONFIG_MAPPING["ernie4_5_moe"](
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    ).save_pretrained(tmp_path / "ernie")  # fmt: skip
    with pytest.raises(ConfigError, match=r"teacher .*ernie.*shared_experts.*Fix: .*families\.py"):
        teacher_dims(str(tmp_path / "ernie"))
    family_config("deepseek_v3").save_pretrained(tmp_path / "dsv3")
    assert teacher_dims(str(tmp_path / "dsv3"))["moe_layers"] == [1, 2]
    raw = json.loads((tmp_path / "dsv3" / "config.json").read_text())
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "config.json").write_text(json.dumps({**raw, "model_type": "llama4"}))
    with pytest.raises(ConfigError, match=r"multimodal 'llama4'.*llama4_text"):
        teacher_dims(str(tmp_path / "mm"))


def test_all_moe_teacher_record_unchanged(tmp_path: Path) -> None:
    """An all-MoE teacher's manifest record keeps exactly its old keys (no moe_layers)."""
    Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
    ).save_pretrained(tmp_path)  # fmt: skip
    assert set(teacher_dims(str(tmp_path))) == {
        "model_type",
        "num_layers",
        "num_experts",
        "hidden_size",
        "vocab_size",
    }


@pytest.mark.parametrize(("command", "role"), [("cache", "teacher"), ("distill", "student")])
def test_cli_refuses_an_unreadable_family_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, role: str
) -> None:
    import ray

    CONFIG_MAPPING["ernie4_5_moe"](
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    ).save_pretrained(tmp_path / "ernie")  # fmt: skip
    config = tiny_config(tmp_path, {f"{role}.build": None, f"{role}.path": str(tmp_path / "ernie")})
    assert main([command, "--config", write_config(config, tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{role} '{tmp_path / 'ernie'}' cannot be read for distillation" in err and "shared_experts" in err
    assert "Fix:" in err and not ray.is_initialized()
