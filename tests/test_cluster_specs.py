"""cluster/: the launcher config, KubeRay manifests, runtime_env and tracking-stack spec are valid and consistent.

    .venv/bin/python -m pytest tests/test_cluster_specs.py -q          # a few seconds, no network, no cluster

What is checked, offline:
  - every YAML under cluster/ parses;
  - cluster/ray-cluster.yaml passes Ray's own prepare_config + validate_config (the checks `ray up` runs first);
  - KubeRay manifests use only field names of KubeRay's CRD and carry its required fields
    (tests/assets/kuberay_crd_fields.json, extracted from ray-project/kuberay, commit noted there);
  - the RayJob entrypoints are commands our strict config loaders accept, and the RayJobs carry cluster/runtime_env.yaml;
  - runtime_env.yaml parses the way `ray job submit --runtime-env` parses it, its pip list equals setup.cfg's
    dependencies, and it holds no secrets;
  - credentials in the Kubernetes manifests come from Secrets only, never literal values, and no file anywhere in
    cluster/ holds a literal credential;
  - the tracking server runs MLflow's basic-auth app with its key, passwords and database from Secrets (no URI holds
    a password), and the Ray pods carry the account it syncs from the same Secret;
  - reach: every Service's pods and every pod the manifests make are selected by a NetworkPolicy; no rule admits the
    whole cluster; MLflow admits only the Ray pods, PostgreSQL only MLflow, the Ray job API only Ray pods, the
    RayJob submitters and the KubeRay operator;
  - docs/SCALE_OUT.md exists, is linked from README.md, and names only real config keys and secrets that exist.
The end-to-end check (make stack-up, ray job submit of experiments/smoke.yaml, the run in MLflow, make stack-down)
is tests/test_stack.py::test_cli_up_status_down_leaves_no_process.
"""
from __future__ import annotations

import configparser
import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD = json.loads((REPO / "tests" / "assets" / "kuberay_crd_fields.json").read_text())
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)


def load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def load_all(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / rel).read_text()) if d]


def setup_cfg_requirements() -> dict[str, str]:
    """{canonical name: specifier} of install_requires + the [ray] extra."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    lines = cp["options"]["install_requires"].splitlines() + cp["options.extras_require"]["ray"].splitlines()
    reqs = [Requirement(s.split("#")[0].strip()) for s in lines if s.split("#")[0].strip()]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def ray_pin() -> str:
    return setup_cfg_requirements()["ray"].removeprefix("==")


def pip_requirements(pip: list[str]) -> dict[str, str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    reqs = [Requirement(s) for s in pip]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


# ----------------------------------------------------------------------------------------------------------
# Parsing

def test_every_cluster_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {p.relative_to(CLUSTER).as_posix() for p in files} >= {
        "ray-cluster.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-distill.yaml",
        "kuberay/rayjob-sweep.yaml", "kuberay/shared-storage.yaml", "tracking/mlflow.yaml"}
    for p in files:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), p


# ----------------------------------------------------------------------------------------------------------
# Ray cluster launcher

def test_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("cluster/ray-cluster.yaml")
    cfg = prepare_config(copy.deepcopy(raw))           # merges the AWS defaults, as `ray up` does
    validate_config(cfg)                                # jsonschema of ray-schema.json + Ray's cross-field checks
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["resources"]
    assert head.get("GPU", 0) == 0
    gpu_groups = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu_groups and all(t["max_workers"] >= 1 for t in gpu_groups)
    # no node type falls back to Ray's defaults file, whose setup_commands install a Ray nightly wheel
    assert "ray-wheels" not in json.dumps(cfg["setup_commands"])
    images = [cfg["docker"]["head_image"], cfg["docker"]["worker_image"]]
    assert all(img.startswith(f"rayproject/ray:{ray_pin()}-") for img in images), images
    assert "gpu" in cfg["docker"]["worker_image"] and "gpu" not in cfg["docker"]["head_image"]
    assert any("--num-gpus=0" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("breakage", ["fractional_gpu", "unknown_head_type", "unknown_top_key"])
def test_launcher_validation_rejects_broken_copies(breakage):
    """The same validator on a deliberately broken copy: it would catch these mistakes in our file."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("cluster/ray-cluster.yaml")
    if breakage == "fractional_gpu":
        raw["available_node_types"]["worker.gpu.8xh100"]["resources"]["GPU"] = 0.5
    elif breakage == "unknown_head_type":
        raw["head_node_type"] = "head.gpu"
    else:
        raw["worker_groups"] = {}
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(raw))


# ----------------------------------------------------------------------------------------------------------
# KubeRay

def kuberay_problems(doc: dict) -> list[str]:
    """Field names against the CRD's, required fields present, pod templates well-formed. [] = fine."""
    out = []

    def keys(where: str, obj: dict, schema: dict) -> None:
        unknown = set(obj) - set(schema["properties"])
        missing = set(schema["required"]) - set(obj)
        out.extend(f"{where}: unknown field {k!r}" for k in sorted(unknown))
        out.extend(f"{where}: missing required field {k!r}" for k in sorted(missing))

    def pod(where: str, template: dict) -> None:
        p = CRD["PodTemplateSpec"]
        out.extend(f"{where}: unknown field {k!r}" for k in sorted(set(template) - set(p["properties"])))
        spec = template.get("spec", {})
        out.extend(f"{where}.spec: missing {k!r}" for k in p["spec.required"] if k not in spec)
        for i, c in enumerate(spec.get("containers", [])):
            out.extend(f"{where}.containers[{i}]: missing {k!r}" for k in p["container.required"] if k not in c)
            for e in c.get("env", []):
                out.extend(f"{where}.containers[{i}].env: missing {k!r}" for k in p["envVar.required"] if k not in e)
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    out.extend(f"{where} env {e.get('name')}: secretKeyRef without {k!r}"
                               for k in p["secretKeyRef.required"] if k not in ref)

    def cluster(where: str, spec: dict) -> None:
        keys(where, spec, CRD["RayCluster"]["spec"])
        head = spec.get("headGroupSpec", {})
        keys(f"{where}.headGroupSpec", head, CRD["RayCluster"]["headGroupSpec"])
        pod(f"{where}.headGroupSpec.template", head.get("template", {}))
        for i, g in enumerate(spec.get("workerGroupSpecs", [])):
            keys(f"{where}.workerGroupSpecs[{i}]", g, CRD["RayCluster"]["workerGroupSpec"])
            pod(f"{where}.workerGroupSpecs[{i}].template", g.get("template", {}))

    if doc.get("apiVersion") != CRD["api_version"]:
        out.append(f"apiVersion {doc.get('apiVersion')!r}, expected {CRD['api_version']!r}")
    if doc.get("kind") == "RayCluster":
        cluster("spec", doc.get("spec", {}))
    elif doc.get("kind") == "RayJob":
        keys("spec", doc.get("spec", {}), CRD["RayJob"]["spec"])
        if "rayClusterSpec" in doc["spec"]:
            cluster("spec.rayClusterSpec", doc["spec"]["rayClusterSpec"])
        if "submitterPodTemplate" in doc["spec"]:
            pod("spec.submitterPodTemplate", doc["spec"]["submitterPodTemplate"])
    else:
        out.append(f"kind {doc.get('kind')!r} is not a KubeRay kind")
    return out


KUBERAY = ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob-distill.yaml", "cluster/kuberay/rayjob-sweep.yaml"]


@pytest.mark.parametrize("rel", KUBERAY)
def test_kuberay_manifest_matches_the_crd(rel):
    assert kuberay_problems(load(rel)) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop("workerGroupSpecs")), "unknown field 'workerGroupSpec'"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas"), "missing required field 'maxReplicas'"),
    (lambda d: d["spec"]["headGroupSpec"].pop("rayStartParams"), "missing required field 'rayStartParams'"),
    (lambda d: d.update(apiVersion="ray.io/v1alpha2"), "apiVersion"),
])
def test_kuberay_check_catches_mistakes(mutate, expected):
    doc = load("cluster/kuberay/raycluster.yaml")
    mutate(doc)
    assert any(expected in p for p in kuberay_problems(doc))


def ray_cluster_specs() -> list[tuple[str, dict]]:
    rc = load("cluster/kuberay/raycluster.yaml")
    job = load("cluster/kuberay/rayjob-distill.yaml")
    return [("raycluster", rc["spec"]), ("rayjob-distill", job["spec"]["rayClusterSpec"])]


def test_kuberay_clusters_have_cpu_head_and_gpu_workers_on_the_pinned_ray():
    for name, spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray_pin(), name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-gpus") == "0", name
        for c in head["template"]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {})), name
            assert c["image"].startswith(f"rayproject/ray:{ray_pin()}-") and "gpu" not in c["image"], name
        workers = spec["workerGroupSpecs"]
        assert workers and all(g["minReplicas"] <= g["maxReplicas"] for g in workers), name
        for g in workers:
            for c in g["template"]["spec"]["containers"]:
                assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
                assert c["image"].startswith(f"rayproject/ray:{ray_pin()}-") and "gpu" in c["image"], name


def test_rayjob_distill_brings_the_same_cluster_as_raycluster_yaml():
    (_, standing), (_, per_job) = ray_cluster_specs()
    assert per_job == standing


def test_rayjob_sweep_targets_the_standing_cluster():
    rc = load("cluster/kuberay/raycluster.yaml")
    job = load("cluster/kuberay/rayjob-sweep.yaml")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    assert job["metadata"]["namespace"] == rc["metadata"]["namespace"]


def test_rayjob_entrypoints_are_accepted_by_our_strict_loaders():
    from rcm_core.config import load_config
    from workflows.sweep import load_sweep

    distill = shlex.split(load("cluster/kuberay/rayjob-distill.yaml")["spec"]["entrypoint"])
    assert distill[:3] == ["python", "workflows/distill.py", "--config"]
    cfg = load_config(REPO / distill[3], distill[4:])
    assert cfg.resources.use_gpu and cfg.train.storage_path.startswith("s3://") and cfg.data.url.startswith("s3://")
    # run folders and teacher weights must be visible from every pod: the shared volume
    assert cfg.train.run_dir.startswith("/shared/") and cfg.teacher.checkpoint.startswith("/shared/")

    sweep = shlex.split(load("cluster/kuberay/rayjob-sweep.yaml")["spec"]["entrypoint"])
    assert sweep[:3] == ["python", "workflows/sweep.py", "--config"]
    spec, base = load_sweep(REPO / sweep[3], sweep[4:])
    assert spec.storage.startswith("/shared/") and base.resources.use_gpu


@pytest.mark.parametrize("rel", ["cluster/kuberay/rayjob-distill.yaml", "cluster/kuberay/rayjob-sweep.yaml"])
def test_rayjobs_carry_the_runtime_env(rel):
    job_env = yaml.safe_load(load(rel)["spec"]["runtimeEnvYAML"])
    file_env = load("cluster/runtime_env.yaml")
    # a RayJob has no local folder to upload: the code is a zip in object storage
    assert re.match(r"^(s3|gs|https)://.+\.zip$", job_env.pop("working_dir"))
    file_env.pop("working_dir")
    file_env.pop("excludes")                            # only meaningful when uploading a local folder
    assert job_env == file_env


def test_shared_volume_is_the_one_the_pods_mount():
    pvc = load("cluster/kuberay/shared-storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name, spec in ray_cluster_specs():
        groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        for g in groups:
            claims = [v["persistentVolumeClaim"]["claimName"] for v in g["template"]["spec"]["volumes"]
                      if "persistentVolumeClaim" in v]
            mounts = [m["mountPath"] for c in g["template"]["spec"]["containers"] for m in c["volumeMounts"]]
            assert pvc["metadata"]["name"] in claims and "/shared" in mounts, name


# ----------------------------------------------------------------------------------------------------------
# runtime_env

def test_runtime_env_parses_like_ray_job_submit_does():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(CLUSTER / "runtime_env.yaml"), working_dir=".")
    validated = RuntimeEnv(**env)                       # Ray's own field validation (pip list, env_vars types)
    assert validated["working_dir"] == "."
    assert set(env) == {"working_dir", "excludes", "pip", "env_vars"}
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env["env_vars"].items())
    # workflows/distill.py passes PYTHONPATH to ray.init; Ray refuses a job whose runtime_env sets it too
    assert "PYTHONPATH" not in env["env_vars"]
    assert {".venv", ".git", "runs", ".stack"} <= set(env["excludes"])


def test_runtime_env_pip_list_is_setup_cfgs_dependencies():
    pip = pip_requirements(load("cluster/runtime_env.yaml")["pip"])
    expected = setup_cfg_requirements()
    del expected["ray"]                                 # the cluster image's Ray; a job must not replace it
    assert pip == expected


# ----------------------------------------------------------------------------------------------------------
# Secrets

LITERAL_CREDENTIALS = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"://[^/\s:@$]+:[^/\s@$]+@"), "a URI with an inline password"),
    (re.compile(r"(?i)(?<![a-z])(password|secret|token|access_key|secret_access_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+_\-]{6,}"),
     "a credential-looking key with a literal value"),
]


def credential_problems(text: str, docs: list[dict]) -> list[str]:
    """Literal credentials in a file's text, and Kubernetes objects that carry them instead of referencing Secrets."""
    out = [f"{what}: {m.group(0)[:40]!r}" for rx, what in LITERAL_CREDENTIALS for m in rx.finditer(text)]

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            if node.get("kind") == "Secret" and (node.get("data") or node.get("stringData")):
                out.append(f"{where}: a Secret with its values in the repository")
            if node.get("kind") == "Secret" and not re.search(
                    rf"kubectl create secret \w+ {re.escape(str(node.get('metadata', {}).get('name')))}\b", text):
                out.append(f"{where}: an example Secret without the kubectl command that creates it")
            is_env_var = isinstance(node.get("name"), str) and ("value" in node or "valueFrom" in node)
            if is_env_var and SECRET_NAME.search(node["name"]) and "secretKeyRef" not in node.get("valueFrom", {}):
                out.append(f"{where}: env {node['name']} is not a secretKeyRef")
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    for i, d in enumerate(docs):
        walk(d, f"doc{i}")
    return out


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_no_literal_credentials_in_cluster_files(path):
    text = path.read_text()
    assert credential_problems(text, [d for d in yaml.safe_load_all(text) if d]) == []


# In code (cluster/local_stack.py): a credential-named key or argument given a quoted literal. "testing" is the one
# allowed value: the local S3 server (moto) accepts any key, and the stack tells clients to use that one.
LITERAL_IN_CODE = re.compile(r"""(?i)(password|passwd|secret|token|access_key|api_key)\w*["']?\s*[:=]\s*["']([^"'\s{}$]{6,})["']""")
DUMMY_VALUES = {"testing"}


def code_credential_problems(text: str) -> list[str]:
    out = [f"{what}: {m.group(0)[:40]!r}" for rx, what in LITERAL_CREDENTIALS[:2] for m in rx.finditer(text)]
    # a URI with a password spliced in by code ({...}) is not a literal; one written out is
    out += [f"a URI with an inline password: {m.group(0)[:40]!r}"
            for m in re.finditer(r"://[^/\s:@${}'\"]+:[^/\s@${}'\"]+@", text)]
    out += [f"a literal credential: {m.group(0)[:40]!r}" for m in LITERAL_IN_CODE.finditer(text)
            if m.group(2) not in DUMMY_VALUES]
    return out


def test_no_literal_credentials_anywhere_in_cluster():
    """Every file under cluster/, not only the manifests: YAML by the manifest rules, anything else by the code
    rules. The generated passwords of the local stack live in its state folder (secrets.json), never here."""
    files = [p for p in sorted(CLUSTER.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    assert {p.suffix for p in files} >= {".yaml", ".py"}
    problems = {}
    for p in files:
        text = p.read_text()
        found = credential_problems(text, [d for d in yaml.safe_load_all(text) if d]) if p.suffix == ".yaml" \
            else code_credential_problems(text)
        if found:
            problems[p.relative_to(CLUSTER).as_posix()] = found
    assert problems == {}


@pytest.mark.parametrize("bad", [
    'PASSWORD = "hunter2hunter2"\n',
    'psycopg2.connect(password="correcthorse")\n',
    'uri = "postgresql://postgres:hunter2hunter2@127.0.0.1:5432/mlflow"\n',
    'MLFLOW_FLASK_SERVER_SECRET_KEY="0123456789abcdef"\n',
])
def test_code_credential_check_catches_literals(bad):
    assert code_credential_problems(bad)
    assert not code_credential_problems('f"postgresql://postgres:{password}@127.0.0.1"\nkey = S3_KEY["x"]\n'
                                        'aws_secret_access_key="testing"\n')


def test_runtime_env_sets_no_credentials():
    env_vars = load("cluster/runtime_env.yaml")["env_vars"]
    assert not [k for k in env_vars if SECRET_NAME.search(k) or k.startswith(("AWS_", "MLFLOW_"))]


@pytest.mark.parametrize("bad", [
    "env:\n  - name: AWS_SECRET_ACCESS_KEY\n    value: wJalrXUtnFEMIK7MDENGbPxRfiCYzz\n",
    "args: ['--backend-store-uri', 'postgresql://mlflow:hunter2hunter2@db:5432/mlflow']\n",
    "kind: Secret\nstringData: {password: x}\n",
    "key: AKIAABCDEFGHIJKLMNOP\n",
    # the auth app's config in a ConfigMap with the admin's password or a database password written in
    "kind: ConfigMap\ndata:\n  basic_auth.ini: |\n    [mlflow]\n    admin_password = hunter2hunter2\n",
    "kind: ConfigMap\ndata:\n  basic_auth.ini: |\n    database_uri = postgresql://mlflow:hunter2hunter2@db:5432/auth\n",
    "kind: Secret\nmetadata: {name: rcm-mlflow-auth}\n",          # an example Secret that says nowhere how to make it
])
def test_credential_check_catches_literals(bad):
    assert credential_problems(bad, [yaml.safe_load(bad)])


def tracking_objects() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in load_all("cluster/tracking/mlflow.yaml")}


def secret_refs(node) -> set[str]:
    found = set()
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            found.add(node["secretKeyRef"]["name"])
        for v in node.values():
            found |= secret_refs(v)
    elif isinstance(node, list):
        for v in node:
            found |= secret_refs(v)
    return found


def test_tracking_stack_is_mlflow_on_postgres_with_s3_artifacts_and_secret_credentials():
    objs = tracking_objects()
    server = objs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(server["args"])
    store = re.search(r'--backend-store-uri\s+"?(\S+?)"?\s', command).group(1)
    assert store.startswith("postgresql")
    # the store URI is assembled from env vars at start and names no user or password: libpq reads PGUSER and
    # PGPASSWORD, which are secretKeyRefs
    assert "@" not in store
    env = {e["name"]: e for e in server["env"]}
    for var in re.findall(r"\$\{(\w+)\}", store):
        assert var in env, var
    for var in ("PGUSER", "PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[var]["valueFrom"], var
    assert re.search(r"--artifacts-destination\s+s3://", command)
    assert ("StatefulSet", "mlflow-postgres") in objs and ("Service", "mlflow-postgres") in objs
    pg = objs[("StatefulSet", "mlflow-postgres")]["spec"]["template"]["spec"]["containers"][0]
    assert "secretKeyRef" in {e["name"]: e for e in pg["env"]}["POSTGRES_PASSWORD"]["valueFrom"]
    host = env["MLFLOW_DB_HOST"]["value"]
    assert host.split(".")[0] == "mlflow-postgres"


def test_tracking_server_asks_who_you_are():
    """MLflow's basic-auth app, configured as MLflow 3.17.2 reads it: the CSRF key, the admin's password and the Ray
    account from Secrets; the auth config file (a ConfigMap) points at the database mlflow_auth that PostgreSQL's
    init script creates, without a password; the account script runs before the server starts."""
    objs = tracking_objects()
    pod = objs[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    server = pod["containers"][0]
    command = " ".join(server["args"])
    assert re.search(r"exec mlflow server --app-name basic-auth\b", command)
    assert '"Flask-WTF<2"' in command                 # the auth app's extra (mlflow[auth]); the image lacks it
    env = {e["name"]: e for e in server["env"]}
    for var in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD", "RCM_RAY_MLFLOW_USERNAME",
                "RCM_RAY_MLFLOW_PASSWORD"):
        assert "secretKeyRef" in env[var]["valueFrom"], var
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    auth_map = objs[("ConfigMap", volumes["auth"]["configMap"]["name"])]["data"]
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    assert config_path.parent.as_posix() == mounts["auth"] and config_path.name in auth_map
    script = re.search(r"python (\S+\.py) &&", command).group(1)
    assert Path(script).parent.as_posix() == mounts["auth"] and Path(script).name in auth_map
    assert command.index(script) < command.index("exec mlflow server")
    ini = configparser.ConfigParser()
    ini.read_string(auth_map[config_path.name])
    assert ini["mlflow"]["default_permission"] == "READ"
    db = ini["mlflow"]["database_uri"]
    assert db.startswith("postgresql") and "@" not in db and db.endswith("/mlflow_auth")
    assert db.split("//")[1].split(":")[0] == env["MLFLOW_DB_HOST"]["value"]
    init = objs[("ConfigMap", "mlflow-postgres-init")]["data"]
    assert any("CREATE DATABASE mlflow_auth" in sql for sql in init.values())


def test_ray_pods_track_to_the_tracking_service():
    service = tracking_objects()[("Service", "mlflow")]
    name, ns, port = service["metadata"]["name"], service["metadata"]["namespace"], service["spec"]["ports"][0]["port"]
    server = tracking_objects()[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    synced = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in server["env"] if e["name"].startswith("RCM_RAY_")}
    for label, spec in ray_cluster_specs():
        for g in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
            for c in g["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in c["env"]}
                assert env["MLFLOW_TRACKING_URI"]["value"] == f"http://{name}.{ns}.svc.cluster.local:{port}", label
                # the account MLflow's client reads in every Ray process: the one the server syncs, from one Secret
                for what in ("USERNAME", "PASSWORD"):
                    ref = env[f"MLFLOW_TRACKING_{what}"]["valueFrom"]["secretKeyRef"]
                    assert ref == synced[f"RCM_RAY_MLFLOW_{what}"], (label, what)


# ----------------------------------------------------------------------------------------------------------
# Reach: NetworkPolicies

def k8s_objects() -> list[dict]:
    """Every Kubernetes object in cluster/ (the launcher config and runtime_env are not Kubernetes objects)."""
    docs = []
    for p in sorted(CLUSTER.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(p.read_text()) if d and "kind" in d and "apiVersion" in d]
    return docs


def pods_of(docs: list[dict]) -> list[tuple[str, dict]]:
    """(where, labels) of every pod the objects make. KubeRay adds ray.io/node-type (head or worker) to the labels
    of the templates we give it; the submitter keeps its template's labels."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        spec = d.get("spec", {})
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            out.append((name, spec["template"].get("metadata", {}).get("labels", {})))
        clusters = [spec] if d["kind"] == "RayCluster" else [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []
        for c in clusters:
            head = c["headGroupSpec"]["template"].get("metadata", {}).get("labels", {})
            out.append((f"{name} head", {**head, "ray.io/node-type": "head"}))
            for g in c.get("workerGroupSpecs", []):
                labels = g["template"].get("metadata", {}).get("labels", {})
                out.append((f"{name} {g['groupName']}", {**labels, "ray.io/node-type": "worker"}))
        if d["kind"] == "RayJob":
            out.append((f"{name} submitter", spec.get("submitterPodTemplate", {}).get("metadata", {}).get("labels", {})))
    return out


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    return bool(selector.get("matchLabels")) and selector["matchLabels"].items() <= labels.items()


def ingress_policies(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "NetworkPolicy" and "Ingress" in d["spec"].get("policyTypes", [])]


def reach_problems(docs: list[dict]) -> list[str]:
    """[] when every pod the objects make (so every Service's pods) is isolated by an ingress NetworkPolicy, every
    Service selects some pod, and every rule names its peers by pod labels (no rule open to all)."""
    out, pods, policies = [], pods_of(docs), ingress_policies(docs)
    for where, labels in pods:
        if not any(selects(p["spec"]["podSelector"], labels) for p in policies):
            out.append(f"{where}: no NetworkPolicy selects its pods {labels}")
    for svc in (d for d in docs if d["kind"] == "Service"):
        if not any(svc["spec"].get("selector", {}).items() <= labels.items() for _, labels in pods):
            out.append(f"Service/{svc['metadata']['name']}: selects none of the pods in cluster/")
    for p in policies:
        for i, rule in enumerate(p["spec"].get("ingress", [])):
            where = f"NetworkPolicy/{p['metadata']['name']} ingress[{i}]"
            if not rule.get("from"):
                out.append(f"{where}: no `from`, so it admits every source")
            for peer in rule.get("from", []):
                if "ipBlock" in peer or not peer.get("podSelector", {}).get("matchLabels"):
                    out.append(f"{where}: a peer not named by pod labels {peer}")
    return out


def test_every_pod_and_service_is_behind_a_network_policy():
    docs = k8s_objects()
    assert {d["kind"] for d in docs} >= {"Service", "Deployment", "StatefulSet", "RayCluster", "RayJob", "NetworkPolicy"}
    assert reach_problems(docs) == []


def admitted(docs: list[dict], labels: dict) -> list[tuple[dict, list]]:
    """(peer, ports) of every ingress rule that applies to pods with `labels`."""
    return [(peer, rule.get("ports")) for p in ingress_policies(docs) if selects(p["spec"]["podSelector"], labels)
            for rule in p["spec"].get("ingress", []) for peer in rule["from"]]


RAY_NODE = {"rcm/role": "ray-node"}


def test_mlflow_and_postgres_admit_only_their_clients():
    docs = k8s_objects()
    assert admitted(docs, {"app": "mlflow"}) == [({"podSelector": {"matchLabels": RAY_NODE}},
                                                  [{"protocol": "TCP", "port": 5000}])]
    assert admitted(docs, {"app": "mlflow-postgres"}) == [({"podSelector": {"matchLabels": {"app": "mlflow"}}},
                                                           [{"protocol": "TCP", "port": 5432}])]
    # every Ray pod carries the label MLflow admits; the submitters do not (they only submit)
    for where, labels in pods_of(k8s_objects()):
        if " head" in where or " gpu-" in where:
            assert RAY_NODE.items() <= labels.items(), where
        if where.endswith("submitter"):
            assert labels == {"rcm/role": "ray-submitter"}, where


def test_ray_job_api_admits_only_ray_pods_submitters_and_the_operator():
    docs = k8s_objects()
    head, worker = {**RAY_NODE, "ray.io/node-type": "head"}, {**RAY_NODE, "ray.io/node-type": "worker"}
    assert admitted(docs, worker) == [({"podSelector": {"matchLabels": RAY_NODE}}, None)]     # all ports, Ray only
    extra = [a for a in admitted(docs, head) if a not in admitted(docs, worker)]
    assert [ports for _, ports in extra] == [[{"protocol": "TCP", "port": 8265}]] * 2
    peers = [peer for peer, _ in extra]
    assert {"podSelector": {"matchLabels": {"rcm/role": "ray-submitter"}}} in peers
    operator = next(p for p in peers if "namespaceSelector" in p)
    assert operator["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}


@pytest.mark.parametrize("breakage, expected", [
    ("drop_mlflow_policy", "Deployment/mlflow: no NetworkPolicy selects"),
    ("open_rule", "no `from`, so it admits every source"),
    ("empty_peer", "a peer not named by pod labels"),
    ("unlabelled_worker", "RayCluster/rcm gpu-8xh100: no NetworkPolicy selects"),
    ("unlabelled_submitter", "RayJob/rcm-sweep-reg-weight submitter: no NetworkPolicy"),
    ("service_without_pods", "Service/mlflow: selects none"),
])
def test_reach_check_catches_mistakes(breakage, expected):
    """The same check on deliberately broken copies of the manifests: each mistake is named."""
    docs = copy.deepcopy(k8s_objects())
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    if breakage == "drop_mlflow_policy":
        docs.remove(by[("NetworkPolicy", "mlflow")])
    elif breakage == "open_rule":
        by[("NetworkPolicy", "mlflow")]["spec"]["ingress"].append({"ports": [{"port": 5000}]})
    elif breakage == "empty_peer":
        by[("NetworkPolicy", "ray-job-api")]["spec"]["ingress"][0]["from"].append({"podSelector": {}})
    elif breakage == "unlabelled_worker":
        del by[("RayCluster", "rcm")]["spec"]["workerGroupSpecs"][0]["template"]["metadata"]
    elif breakage == "unlabelled_submitter":
        del by[("RayJob", "rcm-sweep-reg-weight")]["spec"]["submitterPodTemplate"]
    else:
        by[("Service", "mlflow")]["spec"]["selector"] = {"app": "mlflow-server"}
    assert any(expected in p for p in reach_problems(docs)), reach_problems(docs)


# ----------------------------------------------------------------------------------------------------------
# Docs

def test_scale_out_page_is_linked_and_names_real_keys_and_secrets():
    from rcm_core.config import ExperimentCfg, flatten

    page = (REPO / "docs" / "SCALE_OUT.md").read_text()
    assert "docs/SCALE_OUT.md" in (REPO / "README.md").read_text()
    for needle in ("python workflows/distill.py", "make demo", "make stack-up", "make stack-down",
                   "--working-dir .", "--runtime-env cluster/runtime_env.yaml", "ray job submit"):
        assert needle in page, needle
    keys = set(flatten(ExperimentCfg()))
    named = set(re.findall(r"`((?:data|train|tracking|resources|parallel|teacher)\.[a-z0-9_]+)", page))
    assert {"data.url", "train.storage_path", "tracking.tracking_uri"} <= named
    assert named <= keys, sorted(named - keys)
    # every Secret the manifests reference is created, by name, on the page
    refs = secret_refs(k8s_objects())
    assert {"rcm-mlflow-auth", "rcm-mlflow-ray", "rcm-s3"} <= refs
    for name in refs:
        assert re.search(rf"kubectl create secret generic {name}\b", page), name
