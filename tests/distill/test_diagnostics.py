"""Loss-term gradient diagnostics on a tiny DistillStudent: grouping, norms and cosines against separate
backward passes, the structural zeros of each term, and the metrics logger round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.tiny import OBJECTIVE_EXPERTS, OBJECTIVE_VOCAB, TEACHER_HIDDEN, objective_student

from pipeline.data.collate import distill_positions
from pipeline.distill.diagnostics import (
    PARAMETER_GROUPS,
    grouped_parameters,
    parameter_group,
    term_gradient_metrics,
)
from pipeline.distill.losses import erd_loss, mc_exploration_loss, sft_loss
from pipeline.distill.student import DistillStudent
from pipeline.training.metrics import MetricsLogger

VOCAB, EXPERTS = OBJECTIVE_VOCAB, OBJECTIVE_EXPERTS


@pytest.fixture(scope="module")
def model() -> DistillStudent:
    return objective_student()


def _terms(model: DistillStudent) -> dict[str, torch.Tensor]:
    """SFT, MC and ERD as they enter the total, from one forward on random teacher targets."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    response = torch.zeros_like(input_ids)
    response[:, 4:] = 1
    token_mask = distill_positions(response)
    n = int(token_mask.sum())
    gates = torch.softmax(torch.randn(n, 2, EXPERTS, generator=g), -1)
    states = torch.randn(n, 2, EXPERTS, TEACHER_HIDDEN, generator=g)
    out = model(input_ids, torch.ones_like(input_ids), token_mask)
    logits = out.logits[token_mask]
    sft = sft_loss(logits, input_ids[:, 1:][token_mask[:, :-1]]).mean()
    mc = sum(
        mc_exploration_loss(gates[:, p], states[:, p], out.projected_states[p], 3, 0.2,
                            torch.Generator().manual_seed(p)).mean()
        for p in range(2)
    )  # fmt: skip
    erd = sum(erd_loss(gates[:, p], out.router_probs[p], 0.1).mean() for p in range(2))
    return {"sft": sft, "mc": 0.5 * mc, "erd": erd}


def _separate_grads(
    model: DistillStudent, terms: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """Each term's gradient per group, flattened, from its own .backward()."""
    out = {}
    for name, loss in terms.items():
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        out[name] = {
            group: torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in params
            ])
            for group, params in grouped_parameters(model).items()
        }  # fmt: skip
        out[name]["all"] = torch.cat(list(out[name].values()))
    model.zero_grad(set_to_none=True)
    return out


def test_every_parameter_has_the_group_its_name_says(model: DistillStudent) -> None:
    groups = grouped_parameters(model)
    assert list(groups) == list(PARAMETER_GROUPS)  # all seven present in this student (untied, P learned)
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    expected = {
        "student.model.embed_tokens.weight": "embeddings",
        "student.model.layers.1.self_attn.q_proj.weight": "attention",
        "student.model.layers.0.self_attn.k_norm.weight": "attention",
        "student.model.layers.1.mlp.gate.weight": "routers",
        "student.model.layers.0.mlp.experts.gate_up_proj": "experts",
        "student.model.layers.0.mlp.experts.down_proj": "experts",
        "projections.1.weight": "projections",
        "module.projections.0.weight": "projections",  # DDP-wrapped
        "student.lm_head.weight": "lm_head",
        "student.model.layers.0.input_layernorm.weight": "norms",
        "student.model.norm.weight": "norms",
    }
    assert {name: parameter_group(name) for name in expected} == expected


def test_norms_and_cosines_match_separate_backward_passes(model: DistillStudent) -> None:
    terms = _terms(model)
    metrics = term_gradient_metrics(model, terms)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into .grad
    reference = _separate_grads(model, _terms(model))
    for term, by_group in reference.items():
        for group, grad in by_group.items():
            rest = sum(reference[other][group] for other in reference if other != term)
            norm = metrics[f"grad/{term}/{group}/norm"]
            assert norm == pytest.approx(float(grad.norm()), rel=1e-5, abs=1e-12), (term, group)
            cos = metrics[f"grad/{term}/{group}/cos_rest"]
            if float(grad.norm()) == 0 or float(rest.norm()) == 0:
                assert math.isnan(cos), (term, group)
            else:
                expected = float(grad @ rest / (grad.norm() * rest.norm()))
                assert cos == pytest.approx(expected, abs=1e-5), (term, group)
    assert len(metrics) == 2 * len(terms) * (len(PARAMETER_GROUPS) + 1)


def test_structural_zeros_of_each_term(model: DistillStudent) -> None:
    metrics = term_gradient_metrics(model, _terms(model))
    # SFT never reaches P; MC and ERD never reach the lm_head; ERD never reaches P.
    for term, group in (
        ("sft", "projections"),
        ("mc", "lm_head"),
        ("erd", "lm_head"),
        ("erd", "projections"),
    ):
        assert metrics[f"grad/{term}/{group}/norm"] == 0.0, (term, group)
        assert math.isnan(metrics[f"grad/{term}/{group}/cos_rest"])
    for term, group in (("sft", "lm_head"), ("mc", "experts"), ("mc", "projections"), ("erd", "routers")):
        assert metrics[f"grad/{term}/{group}/norm"] > 0, (term, group)
    # Scaling a term scales its norms exactly (weights are applied before the diagnostics).
    doubled = term_gradient_metrics(model, {**_terms(model), "mc": 2 * _terms(model)["mc"]})
    assert doubled["grad/mc/experts/norm"] == pytest.approx(2 * metrics["grad/mc/experts/norm"], rel=1e-5)


def test_graph_survives_for_the_step_backward(model: DistillStudent) -> None:
    terms = _terms(model)
    term_gradient_metrics(model, terms)
    sum(terms.values()).backward()  # the loop's own backward after the diagnostics
    assert model.projections[0].weight.grad is not None


def test_single_term_gives_no_metrics(model: DistillStudent) -> None:
    assert term_gradient_metrics(model, {"sft": _terms(model)["sft"]}) == {}


def test_metrics_logger_records_them(model: DistillStudent, tmp_path) -> None:
    metrics = term_gradient_metrics(model, _terms(model))
    logger = MetricsLogger(tmp_path)
    logger.log(10, {"loss": 1.0, **metrics})
    logger.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["grad/mc/experts/norm"] == pytest.approx(metrics["grad/mc/experts/norm"])
    assert math.isnan(row["grad/sft/projections/cos_rest"])
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "grad/erd/routers/cos_rest" in header


# ----------------------------------------------------------------------------------------------------------
# `report terms`
# ----------------------------------------------------------------------------------------------------------


def test_terms_report_shares_and_summary(tmp_path) -> None:
    from pipeline.reports.terms import load_term_history, write_terms_report

    run = tmp_path / "students" / "b-distill-run"
    logger = MetricsLogger(run / "metrics")
    for step, (sft_norm, mc_norm) in enumerate([(3.0, 1.0), (1.0, 1.0)], start=1):
        logger.log(
            step * 10,
            {
                "loss_sft": 2.0 / step,
                "loss_mc": 0.5 / step,
                "grad/sft/all/norm": sft_norm,
                "grad/mc/all/norm": mc_norm,
                "grad/sft/all/cos_rest": -0.5,
                "grad/mc/all/cos_rest": -0.5,
                "grad/sft/projections/norm": 0.0,
                "grad/mc/projections/norm": 2.0,
                "grad/sft/projections/cos_rest": math.nan,
                "grad/mc/projections/cos_rest": math.nan,
            },
        )
    logger.log(25, {"loss_sft": 0.7, "loss_mc": 0.2})  # a last row without diagnostics
    logger.close()
    history = load_term_history(run / "metrics" / "metrics.jsonl")
    assert history.terms == ["sft", "mc"] and history.groups == ["all", "projections"]
    shares = history.shares()
    assert shares[:, 0, 0].tolist() == [0.75, 0.5] and shares[:, 1, 1].tolist() == [1.0, 1.0]
    md, png = write_terms_report(run)
    assert md == run / "terms.md" and png.stat().st_size > 0
    text = md.read_text()
    # mean sft share over all parameters (0.75 + 0.5) / 2; projections: MC only, cosine undefined
    assert "| all | 0.62 | -0.50 | 0.38 | -0.50 | sft |" in text
    assert "| projections | 0.00 | – | 1.00 | – | mc |" in text
    assert "| sft | 2.0000 | 0.7000 |" in text
    from pipeline.cli import main  # the same report through `moedistill report terms RUN --out DIR`

    assert main(["report", "terms", str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "terms.md").read_text() == text and (tmp_path / "out" / "terms.png").is_file()


def test_terms_report_explains_a_run_without_diagnostics(tmp_path) -> None:
    from pipeline.errors import DataError
    from pipeline.reports.terms import write_terms_report

    logger = MetricsLogger(tmp_path / "sft-run" / "metrics")
    logger.log(1, {"loss_sft": 1.0})
    logger.close()
    with pytest.raises(DataError, match=r"distill\.diagnostics: true"):
        write_terms_report(tmp_path / "sft-run")
