"""cluster.yaml against Ray's own cluster-launcher validator, and the two paper presets against it.

Offline and fast: no cloud calls, no Ray cluster. `ray up` runs prepare_config (merges the provider's
defaults) and then validate_config (the JSON schema ray/autoscaler/ray-schema.json plus cross-field checks);
so do these tests. The autoscaler's own bin-packing (get_nodes_for) shows that what each preset's stage asks
for lands on the node group meant for it, and the pre-flight resource check (pipeline.placement) accepts a
group scaled to zero from the config `ray up` leaves on the head (~/ray_bootstrap_config.yaml).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.paths import REPO

from pipeline.config import Config, load_config, teacher_cache_hash, with_overrides
from pipeline.errors import MoeDistillError
from pipeline.placement import (
    AUTOSCALED_RESOURCES_ENV,
    autoscalable_resources,
    autoscaler_node_types,
    check_placement,
)

CLUSTER_YAML = REPO / "cluster.yaml"
PRESETS = {
    "qwen": (REPO / "jobs/configs/qwen3-4b-moe-to-0.6b-moe.yaml", "Qwen/Qwen3-4B", "Qwen/Qwen3-0.6B"),
    "llama": (
        REPO / "jobs/configs/llama3.1-8b-moe-to-3.2-1b-moe.yaml",
        "meta-llama/Llama-3.1-8B",
        "meta-llama/Llama-3.2-1B",
    ),
}
GROUP_RESOURCE = {"teacher_gpu": "teacher_node", "student_gpu": "student_node"}


@pytest.fixture(scope="module")
def raw_cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared_cluster(raw_cluster: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw_cluster))
    validate_config(config)
    return config


def load_preset(key: str) -> Config:
    """load_config must accept a preset on any machine: hub ids are not looked up on disk or online."""
    return load_config(PRESETS[key][0])


def test_cluster_yaml_passes_rays_validator(prepared_cluster: dict[str, Any]) -> None:
    import jsonschema
    import ray.autoscaler

    # validate_config already ran in the fixture; the schema check on its own gives a readable failure.
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(prepared_cluster, schema)
    assert prepared_cluster["provider"]["type"] == "aws"
    assert set(prepared_cluster["available_node_types"]) == {"head", "teacher_gpu", "student_gpu"}


def test_gpu_groups_scale_to_zero_and_advertise_one_group_unit_per_gpu(
    prepared_cluster: dict[str, Any],
) -> None:
    node_types = prepared_cluster["available_node_types"]
    head = node_types[prepared_cluster["head_node_type"]]
    assert "GPU" not in head["resources"] and head["max_workers"] == 0
    for group, resource in GROUP_RESOURCE.items():
        spec = node_types[group]
        assert spec["min_workers"] == 0, f"{group} must scale to zero"
        assert spec["max_workers"] >= 1
        assert spec["resources"][resource] == spec["resources"]["GPU"] == 8, spec["resources"]
        other = set(GROUP_RESOURCE.values()) - {resource}
        assert not other & set(spec["resources"]), f"{group} must not advertise {other}"
    total = sum(node_types[g]["max_workers"] for g in GROUP_RESOURCE)
    assert total <= prepared_cluster["max_workers"]


def test_every_node_and_the_submitter_share_the_auth_token(raw_cluster: dict[str, Any]) -> None:
    mounts = raw_cluster["file_mounts"]
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in raw_cluster[key] if "ray start" in c]
        assert len(starts) == 1, raw_cluster[key]
        # Explicit token mode: with RAY_AUTH_MODE unset a node without ~/.ray/auth_token runs with auth OFF.
        assert "export RAY_AUTH_MODE=token" in starts[0]
        assert "test -s ~/.ray/auth_token" in starts[0]
        # The venv's ray, so a job's `python` entrypoint resolves to the venv's python on every node.
        assert "source ~/moe-distill/.venv/bin/activate" in starts[0]


def test_nodes_install_this_checkout_and_mount_the_shared_output_dir(raw_cluster: dict[str, Any]) -> None:
    mounts = raw_cluster["file_mounts"]
    for local in ("pyproject.toml", "README.md", "pipeline", "jobs", "storage_schemas"):
        assert mounts[f"~/moe-distill/{local}"] == f"./{local}"
        assert (REPO / local).exists(), local
    assert ".gitignore" in raw_cluster["rsync_filter"]
    setup = "\n".join(raw_cluster["setup_commands"])
    assert "jobs/bootstrap.sh" in setup and "torch==" in setup
    assert re.search(r"mount -t nfs4 .* /mnt/shared", setup)
    # Nodes refuse any other release than the pinned one, and the pin is this checkout's version.
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    pins = re.findall(r'test "\$v" = "([^"]+)"', setup)
    assert pins == [version], (pins, version)


@pytest.mark.parametrize("key", sorted(PRESETS))
def test_paper_presets_load_with_the_papers_settings(key: str) -> None:
    config = load_preset(key)
    _, teacher_id, student_id = PRESETS[key]
    assert config.data.source == "databricks/databricks-dolly-15k"
    assert config.tokenizer.path == teacher_id
    assert (config.teacher.upcycle_from, config.teacher.num_experts, config.teacher.top_k) == (
        teacher_id,
        4,
        2,
    )
    assert (config.student.upcycle_from, config.student.num_experts, config.student.top_k) == (
        student_id,
        4,
        2,
    )
    d = config.distill
    assert (d.method, d.k, d.alpha, d.beta, d.lambda_mc, d.lambda_erd) == ("b-distill", 3, 0.2, 0.1, 1.0, 1.0)
    for train, resource in ((config.finetune, "teacher_node"), (d.train, "student_node")):
        assert train.use_gpu and train.num_workers == 8
        assert train.resources_per_worker == {resource: 1}
    assert config.cache.resources == {"teacher_node": 1} and config.cache.num_gpus_per_actor == 1
    assert config.evaluate.resources == {"student_node": 1} and config.evaluate.num_gpus_per_actor == 1
    assert config.cache.root.startswith("s3://")
    # output_dir holds Ray Train checkpoints: it must be the shared mount every node has (cluster.yaml).
    assert config.output_dir.startswith("/mnt/shared/")


@pytest.mark.parametrize("key", sorted(PRESETS))
def test_one_cache_serves_every_student_side_ablation(key: str) -> None:
    config = load_preset(key)
    key_of = teacher_cache_hash
    for student_side in (
        {"distill.k": 1},
        {"distill.alpha": 0.5, "distill.beta": 0.0},
        {"distill.method": "kd"},
    ):
        assert key_of(with_overrides(config, student_side)) == key_of(config), student_side
    assert key_of(with_overrides(config, {"cache.logits_k": 32})) != key_of(config)


def _gpu_demands(config: Config) -> dict[str, tuple[list[dict[str, float]], str]]:
    """Per stage: the resource bundles Ray asks for (as Ray Train / Ray Data build them) and the group."""
    from ray.train import ScalingConfig

    def train_bundles(train) -> list[dict[str, float]]:
        scaling = ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=dict(train.resources_per_worker),
        )
        return [scaling._resources_per_worker_not_none] * train.num_workers

    cache_actor = {"GPU": config.cache.num_gpus_per_actor, **config.cache.resources}
    eval_actor = {"GPU": config.evaluate.num_gpus_per_actor, **config.evaluate.resources}
    return {
        "finetune": (train_bundles(config.finetune), "teacher_gpu"),
        "cache": ([cache_actor] * config.cache.num_actors, "teacher_gpu"),
        "distill": (train_bundles(config.distill.train), "student_gpu"),
        "evaluate": ([eval_actor] * config.evaluate.num_actors, "student_gpu"),
    }


@pytest.mark.parametrize("key", sorted(PRESETS))
def test_autoscaler_launches_the_group_each_stage_asks_for(
    key: str, prepared_cluster: dict[str, Any]
) -> None:
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    scorer = functools.partial(
        _default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={})
    )
    head_type, limit = prepared_cluster["head_node_type"], prepared_cluster["max_workers"]
    node_types = prepared_cluster["available_node_types"]
    for stage, (bundles, group) in _gpu_demands(load_preset(key)).items():
        what = f"{key} {stage}: {bundles[0]} x {len(bundles)}"
        to_launch, unplaced = get_nodes_for(node_types, {}, head_type, limit, bundles, scorer)
        assert dict(to_launch) == {group: 1} and not unplaced, f"{what} -> {dict(to_launch)}, {unplaced}"
        # Pinned, not merely preferred: without its group no other node type can take the stage.
        others = {name: spec for name, spec in node_types.items() if name != group}
        to_launch, unplaced = get_nodes_for(others, {}, head_type, limit, bundles, scorer)
        assert not to_launch and len(unplaced) == len(bundles), f"{what} without {group} -> {dict(to_launch)}"


# --- scale-to-zero: the resource check accepts what the autoscaler can start -------------------------------
def _bootstrap_config(prepared_cluster: dict[str, Any], tmp_path: Path, **changes: Any) -> Path:
    """The config `ray up` leaves on the head (~/ray_bootstrap_config.yaml: the prepared config as JSON)."""
    config = copy.deepcopy(prepared_cluster)
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(json.dumps(config))
    return path


HEAD_ONLY = {"CPU": 8.0, "memory": 1e10, "object_store_memory": 1e9}  # a fresh cluster: GPU groups at zero


def test_autoscaler_node_types_of_the_bootstrap_config(
    prepared_cluster: dict[str, Any], tmp_path: Path
) -> None:
    types = autoscaler_node_types(_bootstrap_config(prepared_cluster, tmp_path))
    assert set(types) == {"teacher_gpu", "student_gpu"}  # the head has max_workers 0
    assert types["teacher_gpu"]["teacher_node"] == 8 and "student_node" not in types["teacher_gpu"]
    assert types["student_gpu"]["student_node"] == 8 and "teacher_node" not in types["student_gpu"]
    assert autoscaler_node_types(tmp_path / "absent.yaml") == {}


@pytest.mark.parametrize("key", sorted(PRESETS))
def test_every_stage_of_a_preset_waits_for_its_scaled_to_zero_group(
    key: str, prepared_cluster: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap = _bootstrap_config(prepared_cluster, tmp_path)
    config = load_preset(key)
    stages = {
        "finetune": config.finetune.resources_per_worker,
        "cache": config.cache.resources,
        "distill": config.distill.train.resources_per_worker,
        "evaluate": config.evaluate.resources,
    }
    for stage, resources in stages.items():
        check = check_placement(resources, stage, live=HEAD_ONLY, autoscaler_config=bootstrap, environ={})
        assert check is not None and not check.missing and not check.live, (stage, check)
        group = "teacher_gpu" if stage in ("finetune", "cache") else "student_gpu"
        assert all(repr(group) in source for source in check.autoscaled.values()), (stage, check)
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 1 and "waiting for the autoscaler" in lines[0] and stage in lines[0], lines
    # Once a node of the group is up, the resource is live: no note.
    check = check_placement({"teacher_node": 1}, "cache", live={**HEAD_ONLY, "teacher_node": 8.0},
                            autoscaler_config=bootstrap, environ={})  # fmt: skip
    assert check is not None and check.live == ["teacher_node"] and not capsys.readouterr().out


def test_a_resource_no_node_type_offers_is_still_a_clear_error(
    prepared_cluster: dict[str, Any], tmp_path: Path
) -> None:
    bootstrap = _bootstrap_config(prepared_cluster, tmp_path)
    with pytest.raises(MoeDistillError) as info:
        check_placement({"teacher_gpu_node": 1}, "teacher cache actors (cache.resources)", live=HEAD_ONLY,
                        autoscaler_config=bootstrap, environ={})  # fmt: skip
    message = str(info.value)
    assert "teacher cache actors (cache.resources)" in message and "'teacher_gpu_node'" in message
    assert "cluster resources: ['CPU', 'memory', 'object_store_memory']" in message  # what exists
    assert str(bootstrap) in message and AUTOSCALED_RESOURCES_ENV in message  # where it looked
    assert "ray start --resources" in message and "cluster.yaml" in message  # the fix


@pytest.mark.parametrize(
    "changes",
    [
        {"available_node_types__teacher_gpu__max_workers": 0},  # the group can never start a node
        {"max_workers": 0},  # the cluster can never start a worker
    ],
)
def test_a_group_that_cannot_scale_up_does_not_count(
    changes: dict[str, Any], prepared_cluster: dict[str, Any], tmp_path: Path
) -> None:
    bootstrap = _bootstrap_config(prepared_cluster, tmp_path, **changes)
    assert "teacher_node" not in autoscalable_resources(bootstrap, environ={}, ask_gcs=False)
    with pytest.raises(MoeDistillError, match="teacher_node"):
        check_placement({"teacher_node": 1}, "cache", live=HEAD_ONLY, autoscaler_config=bootstrap, environ={})


def test_the_env_declares_autoscaled_resources_without_a_launcher_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {AUTOSCALED_RESOURCES_ENV: " teacher_node, student_node ,"}
    assert autoscalable_resources(tmp_path / "absent.yaml", environ=env, ask_gcs=False) == {
        "teacher_node": f"${AUTOSCALED_RESOURCES_ENV}",
        "student_node": f"${AUTOSCALED_RESOURCES_ENV}",
    }
    check = check_placement(
        {"student_node": 1}, "distill", live=HEAD_ONLY, autoscaler_config=None, environ=env
    )
    assert check is not None and list(check.autoscaled) == ["student_node"]
    assert AUTOSCALED_RESOURCES_ENV in capsys.readouterr().out
    with pytest.raises(MoeDistillError, match="other_node"):
        check_placement({"other_node": 1}, "distill", live=HEAD_ONLY, autoscaler_config=None, environ=env)
