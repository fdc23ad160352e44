"""infra/: the RayCluster, the Ray cluster-launcher config, the Prefect project and work pool, the Dockerfile.

All offline and fast: the files are parsed and checked with the validators that ship with the installed Ray and
Prefect (Ray's cluster-config schema and validate_config, KubeRay's CR-to-autoscaler translation, Prefect's
prefect.yaml model and its bundled Kubernetes base job template), plus cross-file consistency (one image, one
namespace, one service account, the driver's head address).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="infra tests need the `flow` extra")
jsonschema = pytest.importorskip("jsonschema", reason="infra tests need the `flow` extra")
ray = pytest.importorskip("ray", reason="infra tests need the `flow` extra")
prefect = pytest.importorskip("prefect", reason="infra tests need the `flow` extra")

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAYCLUSTER = INFRA / "ray" / "raycluster.yaml"
AUTOSCALER = INFRA / "ray" / "autoscaler.yaml"
PREFECT_YAML = INFRA / "prefect" / "prefect.yaml"
WORK_POOL = INFRA / "prefect" / "work-pool.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"

# Libraries bpy 4.2 links against or loads headless (X11 client libs, GL/EGL via libglvnd, OpenMP).
BPY_APT_PACKAGES = ("libxrender1", "libxxf86vm1", "libxfixes3", "libxi6", "libxkbcommon0", "libsm6", "libgl1", "libegl1")

# Field names of the KubeRay v1 CRD (ray.io_rayclusters.yaml, KubeRay 1.7): catches misspelt keys, which the API
# server would reject (or silently prune) at `kubectl apply`.
RAYCLUSTER_SPEC_KEYS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy", "rayVersion", "suspend",
    "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}
HEAD_GROUP_KEYS = {
    "enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources", "serviceType", "template",
}
WORKER_GROUP_KEYS = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
    "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}
AUTOSCALER_OPTIONS_KEYS = {
    "args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources",
    "securityContext", "upscalingMode", "version", "volumeMounts",
}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _k8s_docs() -> dict[str, dict]:
    """The documents of raycluster.yaml by kind."""
    docs = [d for d in yaml.safe_load_all(RAYCLUSTER.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), f"one document per kind expected, got {kinds}"
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _k8s_docs()["RayCluster"]


@pytest.fixture(scope="module")
def prefect_project() -> dict:
    return _load(PREFECT_YAML)


@pytest.fixture(scope="module")
def work_pool() -> dict:
    return _load(WORK_POOL)


def _groups(rc: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}


def _pod_specs(rc: dict) -> dict[str, dict]:
    """Pod spec per group, the head included (as "head")."""
    specs = {"head": rc["spec"]["headGroupSpec"]["template"]["spec"]}
    specs.update({name: g["template"]["spec"] for name, g in _groups(rc).items()})
    return specs


def _ray_container(pod_spec: dict) -> dict:
    # KubeRay treats the first container as the Ray container.
    return pod_spec["containers"][0]


# ---------------------------------------------------------------------------------------------------------- RayCluster


def test_raycluster_kind_name_and_keys(raycluster: dict) -> None:
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    assert raycluster["metadata"]["name"] == "flux3d"
    spec = raycluster["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC_KEYS, set(spec) - RAYCLUSTER_SPEC_KEYS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_KEYS, set(spec["headGroupSpec"]) - HEAD_GROUP_KEYS
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS_KEYS
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_KEYS, (group["groupName"], set(group) - WORKER_GROUP_KEYS)
        # KubeRay's rayStartParams is a map of strings; an unquoted 0 or 8 fails CRD validation.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["groupName"]
    assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values())


def test_raycluster_rayversion_matches_installed_ray(raycluster: dict) -> None:
    assert raycluster["spec"]["rayVersion"] == ray.__version__


def test_raycluster_autoscaling_and_head_takes_no_work(raycluster: dict) -> None:
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    params = spec["headGroupSpec"]["rayStartParams"]
    assert params["num-cpus"] == "0"
    assert params["dashboard-host"] == "0.0.0.0"
    assert "num-gpus" not in params or params["num-gpus"] == "0"


def test_raycluster_worker_groups_scale_from_zero(raycluster: dict) -> None:
    groups = _groups(raycluster)
    assert set(groups) == {"cpu-render", "gpu-a100"}
    for name, g in groups.items():
        assert 0 == g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], name
    assert groups["cpu-render"]["maxReplicas"] == 64
    assert groups["gpu-a100"]["maxReplicas"] == 8


def test_raycluster_one_image_everywhere(raycluster: dict) -> None:
    images = {c["image"] for spec in _pod_specs(raycluster).values() for c in spec["containers"]}
    assert len(images) == 1, images
    assert raycluster["spec"].get("autoscalerOptions", {}).get("image") in (None, *images)


def test_raycluster_resources_requests_equal_limits(raycluster: dict) -> None:
    for name, spec in _pod_specs(raycluster).items():
        resources = _ray_container(spec)["resources"]
        assert resources["requests"] == resources["limits"], name


def test_raycluster_gpu_group(raycluster: dict) -> None:
    group = _groups(raycluster)["gpu-a100"]
    spec = group["template"]["spec"]
    limits = _ray_container(spec)["resources"]["limits"]
    gpus = int(limits["nvidia.com/gpu"])
    assert gpus == 8
    if "num-gpus" in group["rayStartParams"]:
        assert int(group["rayStartParams"]["num-gpus"]) == gpus
    # Only the GPU group may sit on (tainted) GPU nodes, and it must select them.
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    assert spec["nodeSelector"], "the GPU group must select A100 nodes"
    # /dev/shm for DataLoader workers: a memory-backed emptyDir mounted there.
    mounts = {m["mountPath"]: m["name"] for m in _ray_container(spec)["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    # The CPU groups must not ask for GPUs.
    for name in ("head", "cpu-render"):
        assert "nvidia.com/gpu" not in _ray_container(_pod_specs(raycluster)[name])["resources"]["limits"]


def test_raycluster_as_the_kuberay_autoscaler_sees_it(raycluster: dict) -> None:
    """Ray's own translation of the CR (what the in-tree autoscaler runs), validated by Ray's validate_config."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    config = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(raycluster))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]
    render = types["cpu-render"]["resources"]
    assert render["CPU"] == 16 and "GPU" not in render
    # The `render` custom resource parsed (a quoting mistake in rayStartParams drops it) and is one per CPU.
    assert render["render"] == render["CPU"]
    gpu = types["gpu-a100"]["resources"]
    assert gpu["GPU"] == 8
    assert (types["gpu-a100"]["min_workers"], types["gpu-a100"]["max_workers"]) == (0, 8)
    assert config["max_workers"] == 64 + 8


def test_raycluster_env_and_its_configmap(raycluster: dict) -> None:
    docs = _k8s_docs()
    configmap = docs["ConfigMap"]
    for name, spec in _pod_specs(raycluster).items():
        env = {e["name"]: e for e in _ray_container(spec).get("env", [])}
        ref = env["PREFECT_API_URL"]["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == configmap["metadata"]["name"], name
        assert ref["key"] in configmap["data"], name
    # The head names a ServiceAccount, so KubeRay expects it to exist: it is created in the same file.
    accounts = {spec.get("serviceAccountName") for spec in _pod_specs(raycluster).values()}
    assert accounts == {docs["ServiceAccount"]["metadata"]["name"]}
    namespaces = {d["metadata"]["namespace"] for d in docs.values()}
    assert namespaces == {raycluster["metadata"]["namespace"]}


# ------------------------------------------------------------------------------------------------ Ray cluster launcher


def test_autoscaler_matches_ray_schema() -> None:
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    config = _load(AUTOSCALER)
    jsonschema.validate(config, json.loads(schema_path.read_text()))


def test_autoscaler_passes_ray_validate_config() -> None:
    """What `ray up` does before it talks to AWS: merge with the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load(AUTOSCALER))
    validate_config(config)
    assert config["cluster_name"] == "flux3d"
    assert config["provider"]["type"] == "aws" and config["provider"]["region"] == "us-east-1"


def test_autoscaler_node_types() -> None:
    config = _load(AUTOSCALER)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert set(types) == {"head", "cpu_render", "gpu_a100"}
    assert types["head"]["resources"]["CPU"] == 0
    assert types["head"]["node_config"]["InstanceType"] == "m6i.2xlarge"
    assert types["cpu_render"]["node_config"]["InstanceType"] == "c6i.8xlarge"
    assert types["gpu_a100"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert types["gpu_a100"]["resources"]["GPU"] == 8
    render = types["cpu_render"]["resources"]
    assert render["render"] == render["CPU"]
    for name in ("cpu_render", "gpu_a100"):
        assert 0 == types[name]["min_workers"] <= types[name]["max_workers"], name
    assert (types["cpu_render"]["max_workers"], types["gpu_a100"]["max_workers"]) == (64, 8)
    assert config["max_workers"] == sum(t.get("max_workers", 0) for n, t in types.items() if n != "head")


def test_autoscaler_sets_every_command_list() -> None:
    """Keys left out are filled from Ray's AWS defaults, whose setup_commands pip-install a dev wheel of Ray."""
    config = _load(AUTOSCALER)
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    # The image has Ray; installing another one at node start would split the cluster's versions.
    commands = " ".join(config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"])
    assert "ray" not in re.findall(r"[\w.-]+", commands), commands


# ----------------------------------------------------------------------------------------------------- Prefect project


def test_prefect_yaml_is_valid_for_prefect_deploy(prefect_project: dict) -> None:
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, RawScheduleConfig

    model = PrefectYamlModel.model_validate(prefect_project)
    assert model.name == "flux3d"
    assert model.prefect_version == prefect.__version__
    assert not prefect_project.get("build") and not prefect_project.get("push")
    known = set(DeploymentConfig.model_fields)
    for deployment in prefect_project["deployments"]:
        # DeploymentConfig ignores unknown keys, so a misspelt `schedule`/`work_pool` would vanish silently.
        assert set(deployment) <= known, (deployment["name"], set(deployment) - known)
        for schedule in deployment.get("schedules") or []:
            RawScheduleConfig.model_validate(schedule)
    assert [d["name"] for d in prefect_project["deployments"]] == ["data", "retrain", "pipeline"]


def test_prefect_pull_step_is_the_image_workdir(prefect_project: dict) -> None:
    (step,) = prefect_project["pull"]
    (name, args), = step.items()
    assert name == "prefect.deployments.steps.set_working_directory"
    assert args["directory"] == _dockerfile_workdir()


def test_prefect_schedules(prefect_project: dict) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    deployments = {d["name"]: d for d in prefect_project["deployments"]}
    assert not deployments["data"].get("schedules") and not deployments["data"].get("schedule")
    assert not deployments["pipeline"].get("schedules") and not deployments["pipeline"].get("schedule")
    (schedule,) = deployments["retrain"]["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # Prefect's own validation (raises)
    assert schedule["cron"] == "0 3 * * 0"
    zoneinfo.ZoneInfo(schedule["timezone"])
    assert schedule["timezone"] == "UTC"


def test_prefect_deployments_target_the_pool_and_the_cluster(prefect_project: dict, work_pool: dict) -> None:
    for d in prefect_project["deployments"]:
        assert d["work_pool"]["name"] == work_pool["name"], d["name"]
        assert d["work_pool"]["job_variables"]["image"] == work_pool["variables"]["image"], d["name"]
        # The driver pod joins the Ray cluster before the flow starts (work pool command), so "auto" finds it.
        assert d["parameters"]["ray_address"] == "auto", d["name"]
        assert d["parameters"]["root"].startswith("s3://"), d["name"]


@pytest.mark.parametrize("name", ["data", "retrain", "pipeline"])
def test_prefect_entrypoint_is_a_flow_that_accepts_the_parameters(prefect_project: dict, name: str) -> None:
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    deployment = next(d for d in prefect_project["deployments"] if d["name"] == name)
    path, func = deployment["entrypoint"].split(":")
    flow = load_flow_from_entrypoint(f"{REPO / path}:{func}", use_placeholder_flow=False)
    assert isinstance(flow, Flow)
    flow.validate_parameters(dict(deployment["parameters"]))


def test_prefect_yaml_agrees_with_flux3d_deploy(prefect_project: dict) -> None:
    """`flux3d deploy` registers the same deployments from Python; names and the retrain schedule must agree."""
    from flux3d.config.flow import FlowConfig
    from flux3d.flows.deploy import DEPLOYMENTS

    deployments = {d["name"]: d for d in prefect_project["deployments"]}
    assert set(deployments) == set(DEPLOYMENTS)
    (schedule,) = deployments["retrain"]["schedules"]
    defaults = FlowConfig()
    assert (schedule["cron"], schedule["timezone"]) == (defaults.retrain_cron, defaults.timezone)


def test_prefect_config_parameter_ships_in_the_image(prefect_project: dict) -> None:
    """The `config` path is inside /opt/flux3d, so it must be a repo file that the Dockerfile copies."""
    from flux3d.config.load import load_config

    workdir = _dockerfile_workdir()
    for d in prefect_project["deployments"]:
        config = Path(d["parameters"]["config"])
        rel = config.relative_to(workdir)
        assert (REPO / rel).is_file(), rel
        load_config(REPO / rel)  # and it is a valid flux3d config
        copied = [src for inst in _dockerfile() if inst[0] == "COPY" for src in inst[1].split()[:-1]]
        assert any(rel.as_posix() == s.rstrip("/") or rel.as_posix().startswith(s.rstrip("/") + "/")
                   for s in copied), (rel, copied)


# ----------------------------------------------------------------------------------------------------------- Work pool


def _kubernetes_default_template() -> dict:
    """The default Kubernetes base job template that ships with the installed Prefect (what
    `prefect work-pool get-default-base-job-template --type kubernetes` prints offline)."""
    path = Path(prefect.__file__).parent / "server" / "api" / "collections_data" / "views"
    metadata = json.loads((path / "aggregate-worker-metadata.json").read_text())
    return copy.deepcopy(metadata["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"])


def _merged_template(work_pool: dict) -> dict:
    """The merge the comment in work-pool.yaml documents."""
    template = _kubernetes_default_template()
    for key, value in work_pool["variables"].items():
        template["variables"]["properties"][key]["default"] = value
    return template


def test_work_pool_variables_exist_and_fit_the_template(work_pool: dict) -> None:
    assert work_pool["name"] == "flux3d-k8s" and work_pool["type"] == "kubernetes"
    variables = _kubernetes_default_template()["variables"]
    for key, value in work_pool["variables"].items():
        assert key in variables["properties"], f"{key} is not a variable of the Kubernetes base job template"
        schema = {**variables["properties"][key], "definitions": variables.get("definitions", {})}
        jsonschema.validate(value, schema)


def _render_job(work_pool: dict, job_variables: dict) -> dict:
    """The job configuration a Kubernetes worker builds for a run (BaseJobConfiguration.from_template_and_values)."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    template = _merged_template(work_pool)
    values = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    values.update(job_variables)
    return apply_values(template["job_configuration"], values)


def test_work_pool_renders_the_driver_job(work_pool: dict, prefect_project: dict, raycluster: dict) -> None:
    for deployment in prefect_project["deployments"]:
        job = _render_job(work_pool, deployment["work_pool"]["job_variables"])
        manifest = job["job_manifest"]
        pod = manifest["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"},
                                          "limits": {"cpu": "2", "memory": "8Gi"}}
        assert container["image"] == _ray_container(_pod_specs(raycluster)["head"])["image"]
        assert manifest["metadata"]["namespace"] == raycluster["metadata"]["namespace"]
        assert pod["serviceAccountName"] == _k8s_docs()["ServiceAccount"]["metadata"]["name"]


def test_work_pool_command_joins_the_ray_cluster(work_pool: dict, raycluster: dict) -> None:
    argv = shlex.split(work_pool["variables"]["command"])  # what the Kubernetes worker does with it
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3, argv
    script = argv[2]
    name, namespace = raycluster["metadata"]["name"], raycluster["metadata"]["namespace"]
    (start, run) = (part.strip() for part in script.split("&&"))
    start_argv = shlex.split(start)
    assert start_argv[:2] == ["ray", "start"]
    # KubeRay's head Service is `<cluster>-head-svc`; 6379 is the GCS port.
    assert f"--address={name}-head-svc.{namespace}.svc.cluster.local:6379" in start_argv
    assert "--num-cpus=0" in start_argv and "--num-gpus=0" in start_argv
    assert "--head" not in start_argv and "--block" not in start_argv
    assert run == "exec prefect flow-run execute"


# ---------------------------------------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, backslash continuations joined."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            current = ""
    assert not current, "dangling line continuation"
    return instructions


def _dockerfile_workdir() -> str:
    workdirs = [args for keyword, args in _dockerfile() if keyword == "WORKDIR"]
    assert workdirs, "no WORKDIR"
    return workdirs[-1]


def _index(instructions: list[tuple[str, str]], pred: Callable[[tuple[str, str]], bool], what: str) -> int:
    found = [i for i, inst in enumerate(instructions) if pred(inst)]
    assert found, f"Dockerfile: no {what}"
    return found[0]


def test_dockerfile_base_and_python() -> None:
    instructions = _dockerfile()
    keyword, image = instructions[0]
    assert keyword == "FROM" and "cuda" in image, image
    runs = " ".join(args for k, args in instructions if k == "RUN")
    assert re.search(r"apt-get install[^&]*\bpython3\.11\b", runs), "python3.11 must be installed by apt"
    assert "python3.11 -m venv" in runs
    # The image's Python must satisfy the package's requires-python (bpy 4.2 is CPython 3.11 only).
    from packaging.specifiers import SpecifierSet

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "3.11" in SpecifierSet(pyproject["project"]["requires-python"])
    assert _dockerfile_workdir() == "/opt/flux3d"
    env = " ".join(args for k, args in instructions if k == "ENV")
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in env


def test_dockerfile_installs_bpy_system_libraries() -> None:
    apt_lines = [args for k, args in _dockerfile() if k == "RUN" and "apt-get install" in args]
    packages = set(" ".join(apt_lines).split())
    missing = [p for p in BPY_APT_PACKAGES if p not in packages]
    assert not missing, f"not installed by apt-get: {missing}"


def test_dockerfile_installs_with_constraints_and_extras() -> None:
    instructions = _dockerfile()
    pip = [args for k, args in instructions if k == "RUN" and "pip install" in args and "-c constraints.txt" in args]
    assert pip, "no `pip install -c constraints.txt ...`"
    extras = re.search(r"\.\[([\w,-]+)\]", pip[0])
    assert extras, pip[0]
    assert set(extras.group(1).split(",")) == {"data", "ml", "flow"}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert {"data", "ml", "flow"} <= set(pyproject["project"]["optional-dependencies"])


def test_dockerfile_copies_dependency_files_before_the_package() -> None:
    """Layer cache: the dependency install must not depend on the package's source."""
    instructions = _dockerfile()

    def copies(name: str) -> Callable[[tuple[str, str]], bool]:
        return lambda inst: inst[0] == "COPY" and name in inst[1].split()[:-1]

    deps = _index(instructions, copies("pyproject.toml"), "COPY of pyproject.toml")
    assert deps == _index(instructions, copies("constraints.txt"), "COPY of constraints.txt")
    install = _index(instructions, lambda inst: inst[0] == "RUN" and "-c constraints.txt" in inst[1],
                     "pip install -c constraints.txt")
    package = _index(instructions, lambda inst: inst[0] == "COPY" and any(
        s.rstrip("/") in ("flux3d", ".") for s in inst[1].split()[:-1]), "COPY of the flux3d package")
    assert deps < install < package, "pyproject.toml + constraints.txt, then pip install, then the package"


# --------------------------------------------------------------------------------------------------------- Cross-file


def test_one_image_in_every_file(raycluster: dict, prefect_project: dict, work_pool: dict) -> None:
    images = {_ray_container(spec)["image"] for spec in _pod_specs(raycluster).values()}
    images.add(_load(AUTOSCALER)["docker"]["image"])
    images.add(work_pool["variables"]["image"])
    images.update(d["work_pool"]["job_variables"]["image"] for d in prefect_project["deployments"])
    assert len(images) == 1, images
