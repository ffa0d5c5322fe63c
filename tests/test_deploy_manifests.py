"""deploy/k8s: every kustomization renders offline (`kubectl kustomize`), every object validates
against the Kubernetes schemas (kubernetes-validate, strict: unknown fields fail) of the oldest and
the newest version the manifests are meant for, PodMonitor and LeaderWorkerSet against a schema of
the fields used here (their pod templates against the core PodTemplate schema), and the pieces fit
together:

* the commands: the supervisor's, the model-repository tool's and sglang-router's arguments parse
  with their real parsers, after Kubernetes' $(VAR) expansion, and every $(VAR) is defined; the
  settings they give are valid engine / adapter settings (EngineConfig.from_flat);
* the router discovers exactly the serving pods (its selector matches the engine and LWS-leader
  pod labels, not the workers' or its own) on their OpenAI port, in its own namespace, with the
  API key of the engines, and its Role lets it watch pods;
* every probe, Service and PodMonitor port is a container port of the pods it is meant for;
* the HPA's metric is a gauge the engine defines (minisgl_backend/triton/metrics.py), the
  prometheus-adapter rule exposes it under that name, and the PodMonitor scrapes the pods the
  HPA scales;
* GPU overlays: tp_size = the GPUs of a replica (all nodes of an LWS group); the CPU overlay
  caps torch threads below the cores it requests;
* multi-node: leader = node 0 with nnodes = LWS_GROUP_SIZE, workers = node LWS_WORKER_INDEX,
  one rendezvous address and port, settings that node 0's admission check accepts.

One slow test (markers slow, triton) runs the CPU overlay's engine pod here, its commands as the
manifest gives them, and sglang-router with the manifest's flags in front of it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import jsonschema
import pytest
import yaml

from minisgl_backend.checkout import ROOT

DEPLOY = ROOT / "deploy" / "k8s"
DOCS = ROOT / "docs" / "deploy.md"
# the range of Kubernetes versions the manifests are written for
K8S_VERSIONS = ("1.28.0", "1.37.0")
OVERLAYS = ("overlays/cpu", "overlays/gpu", "overlays/multinode-gpu")
GPU_OVERLAYS = ("overlays/gpu", "overlays/multinode-gpu")
KUSTOMIZATIONS = (*OVERLAYS, "prometheus-adapter", "model-loader")
VAR_RE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
LWS_API = "leaderworkerset.x-k8s.io/v1"


# ---------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=None)
def _render(path: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed: `kubectl kustomize` renders deploy/k8s offline")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize deploy/k8s/{path} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def render(path: str) -> list[dict]:
    return copy.deepcopy(list(_render(path)))


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


class PodTemplate:
    """A pod template of the rendering and what runs it: a Deployment's, a LeaderWorkerSet's
    leader / worker template, or a bare Pod."""

    def __init__(self, owner: dict, role: str, template: dict, worker_index: int | None = None) -> None:
        self.owner, self.role, self.template = owner, role, template
        self.worker_index = worker_index
        self.labels: dict[str, str] = template.get("metadata", {}).get("labels", {})
        self.spec: dict = template["spec"]

    @property
    def name(self) -> str:
        return f"{self.owner['kind']}/{self.owner['metadata']['name']}:{self.role}"

    def containers(self, init: bool = True) -> list[dict]:
        return [*(self.spec.get("initContainers", []) if init else []), *self.spec["containers"]]

    def container(self, name: str) -> dict:
        found = [c for c in self.containers() if c["name"] == name]
        assert len(found) == 1, f"{self.name}: no container {name}"
        return found[0]

    def volume(self, name: str) -> dict:
        found = [v for v in self.spec.get("volumes", []) if v["name"] == name]
        assert len(found) == 1, f"{self.name}: no volume {name}"
        return found[0]

    def lws_env(self) -> dict[str, str]:
        """What the LeaderWorkerSet controller sets in every container (group 0)."""
        if self.owner["kind"] != "LeaderWorkerSet":
            return {}
        name, ns = self.owner["metadata"]["name"], self.owner["metadata"].get("namespace", "default")
        return {"LWS_LEADER_ADDRESS": f"{name}-0.{name}.{ns}",
                "LWS_GROUP_SIZE": str(self.owner["spec"]["leaderWorkerTemplate"].get("size", 1)),
                "LWS_WORKER_INDEX": str(self.worker_index)}


def pod_templates(objects: list[dict]) -> list[PodTemplate]:
    out = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append(PodTemplate(o, "pod", o["spec"]["template"]))
        elif o["kind"] == "Pod":
            out.append(PodTemplate(o, "pod", o))
        elif o["kind"] == "LeaderWorkerSet":
            lwt = o["spec"]["leaderWorkerTemplate"]
            out.append(PodTemplate(o, "leader", lwt.get("leaderTemplate") or lwt["workerTemplate"], worker_index=0))
            out.append(PodTemplate(o, "worker", lwt["workerTemplate"], worker_index=1))
    return out


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def serving_templates(objects: list[dict]) -> list[PodTemplate]:
    """The pods that run tritonserver + the OpenAI frontend (their container is `engine`)."""
    return [t for t in pod_templates(objects) if any(c["name"] == "engine" for c in t.containers(init=False))]


# ---------------------------------------------------------------- environment and $(VAR) expansion


def container_env(template: PodTemplate, container: dict, objects: list[dict]) -> dict[str, str]:
    """The variables a container sees, as Kubernetes resolves them for $(VAR) expansion: env
    values, ConfigMap keys (envFrom / configMapKeyRef, from the rendered ConfigMaps), downward-API
    fields, the LWS controller's variables; a Secret's value is a placeholder naming it."""
    env: dict[str, str] = dict(template.lws_env())
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in find(objects, "ConfigMap")}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in configmaps, f"{template.name}/{container['name']}: envFrom ConfigMap {ref} is not rendered"
        env.update(configmaps[ref])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            assert ref["name"] in configmaps, f"{template.name}: ConfigMap {ref['name']} is not rendered"
            assert ref["key"] in configmaps[ref["name"]], f"{template.name}: {ref['name']} has no key {ref['key']}"
            env[var["name"]] = configmaps[ref["name"]][ref["key"]]
        elif "secretKeyRef" in source:
            env[var["name"]] = f"<secret {source['secretKeyRef']['name']}/{source['secretKeyRef']['key']}>"
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            downward = {"metadata.namespace": template.owner["metadata"]["namespace"], "status.podIP": "10.1.2.3"}
            assert path in downward, f"unexpected fieldRef {path}"
            env[var["name"]] = downward[path]
        else:
            raise AssertionError(f"{template.name}: unexpected env source {source}")
    return env


def expand(template: PodTemplate, container: dict, objects: list[dict],
           overrides: dict[str, str] | None = None) -> list[str]:
    """command + args after Kubernetes' $(VAR) expansion; every reference must be defined
    (Kubernetes leaves an undefined one as the literal text)."""
    env = {**container_env(template, container, objects), **(overrides or {})}
    words = [*container.get("command", []), *container.get("args", [])]
    undefined = sorted({m for w in words for m in VAR_RE.findall(w) if m not in env})
    assert not undefined, f"{template.name}/{container['name']}: $(VAR) with no such variable: {undefined}"
    return [VAR_RE.sub(lambda m: env[m.group(1)], w) for w in words]


def module_args(words: list[str], module: str) -> list[str]:
    """The arguments after `python -m MODULE`."""
    assert words[:3] in (["python3", "-m", module], ["python", "-m", module]), f"expected python -m {module}: {words}"
    return words[3:]


def settings_of(args: list[str]) -> dict[str, str]:
    """--set KEY=VALUE pairs, empty values dropped (the repository tool skips them too)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[])
    known, _ = parser.parse_known_args(args)
    pairs = [item.partition("=") for item in known.set]
    assert all(sep for _, sep, _ in pairs), f"--set without '=': {known.set}"
    return {k: v for k, _, v in pairs if v != ""}


# ---------------------------------------------------------------- schemas of the custom resources

DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"}
LABEL_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                           "namespace": {"type": "string"}, "labels": LABEL_MAP, "annotations": LABEL_MAP}}
INT_OR_STRING = {"type": ["integer", "string"]}

# monitoring.coreos.com/v1 PodMonitor: the fields these manifests use
PODMONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"}, "metadata": METADATA,
        "spec": {"type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": {"type": "object", "additionalProperties": False,
                                  "properties": {"matchLabels": LABEL_MAP}, "required": ["matchLabels"]},
                     "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["port"], "additionalProperties": False,
                         "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                                        "interval": DURATION, "scrapeTimeout": DURATION}}}}}}}

# leaderworkerset.x-k8s.io/v1 LeaderWorkerSet (api/leaderworkerset/v1/leaderworkerset_types.go);
# the two pod templates are validated against the core schema separately
LWS_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": LWS_API}, "kind": {"const": "LeaderWorkerSet"}, "metadata": METADATA,
        "spec": {"type": "object", "required": ["leaderWorkerTemplate"], "additionalProperties": False, "properties": {
            "replicas": {"type": "integer", "minimum": 0},
            "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
            "rolloutStrategy": {"type": "object", "additionalProperties": False, "required": ["type"], "properties": {
                "type": {"const": "RollingUpdate"},
                "rollingUpdateConfiguration": {"type": "object", "additionalProperties": False, "properties": {
                    "partition": {"type": "integer"}, "maxUnavailable": INT_OR_STRING, "maxSurge": INT_OR_STRING}}}},
            "networkConfig": {"type": "object", "properties": {
                "subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}}},
            "leaderWorkerTemplate": {
                "type": "object", "required": ["workerTemplate"], "additionalProperties": False, "properties": {
                    "size": {"type": "integer", "minimum": 1},
                    "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"]},
                    "leaderTemplate": {"type": "object", "required": ["spec"]},
                    "workerTemplate": {"type": "object", "required": ["spec"]}}}}}}}

CUSTOM_SCHEMAS = {("monitoring.coreos.com/v1", "PodMonitor"): PODMONITOR_SCHEMA, (LWS_API, "LeaderWorkerSet"): LWS_SCHEMA}


def k8s_validate(obj: dict) -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']}/{obj['metadata'].get('name')} (Kubernetes {version}): "
                                 f"{exc.message} at {'/'.join(map(str, exc.path))}") from None


# ---------------------------------------------------------------- the tests


def test_every_kustomization_is_rendered_here():
    """A kustomization added under deploy/k8s is rendered and checked by this module (components
    through the overlays that include them)."""
    found = set()
    for path in DEPLOY.rglob("kustomization.yaml"):
        if yaml.safe_load(path.read_text())["kind"] == "Kustomization" and path.parent != DEPLOY / "base":
            found.add(str(path.parent.relative_to(DEPLOY)))
    assert found == set(KUSTOMIZATIONS)
    components = {str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml")
                  if yaml.safe_load(p.read_text())["kind"] == "Component"}
    used = {str((DEPLOY / o / c).resolve().relative_to(DEPLOY.resolve()))
            for o in OVERLAYS for c in yaml.safe_load((DEPLOY / o / "kustomization.yaml").read_text()).get("components", [])}
    assert components <= used, f"components no overlay includes: {components - used}"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_objects_validate_against_their_schemas(path):
    objects = render(path)
    assert objects
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM_SCHEMAS:
            jsonschema.validate(obj, CUSTOM_SCHEMAS[key])
        else:
            k8s_validate(obj)
    for t in pod_templates(objects):
        if t.owner["kind"] == "LeaderWorkerSet":  # its templates against the core PodTemplate schema
            k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "lws-" + t.role},
                          "template": t.template})


def test_the_validation_catches_a_misspelt_field():
    """The strict schemas reject what a typo produces (an unknown field), not only wrong types."""
    deployment = copy.deepcopy(one(render("overlays/cpu"), "Deployment", "minisgl-engine"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"port": 9000}}
    with pytest.raises(AssertionError, match="readinesProbe"):
        k8s_validate(deployment)
    monitor = copy.deepcopy(find(render("overlays/cpu"), "PodMonitor")[0])
    monitor["spec"]["podMetricsEndpoints"][0]["targetport"] = 9000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, PODMONITOR_SCHEMA)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_references_resolve(path):
    """Every ConfigMap, PVC and ServiceAccount a pod names is in the rendering (kustomize adds a
    hash to generated ConfigMaps and must rewrite every reference, a LeaderWorkerSet's included);
    the Secret is the one docs/deploy.md creates, with that key."""
    objects = render(path)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    secret = re.search(r"create secret generic (\S+) --from-literal=([\w.-]+)=", DOCS.read_text())
    assert secret, "docs/deploy.md: no `kubectl create secret generic NAME --from-literal=KEY=...`"
    pvcs = {o["metadata"]["name"] for o in find(render("overlays/gpu"), "PersistentVolumeClaim")}
    for t in pod_templates(objects):
        for c in t.containers():
            container_env(t, c, objects)  # asserts the ConfigMaps and keys exist
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert (ref["name"], ref["key"]) == secret.groups(), f"{t.name}: secret {ref}"
        for v in t.spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                # the model loader is applied beside an overlay that owns the claim
                assert ("PersistentVolumeClaim", claim) in names or (path == "model-loader" and claim in pvcs), \
                    f"{t.name}: PVC {claim} is not rendered"
        account = t.spec.get("serviceAccountName")
        if account:
            assert ("ServiceAccount", account) in names


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_probe_service_and_monitor_port_is_a_container_port(path):
    objects = render(path)
    templates = pod_templates(objects)
    for t in templates:
        for c in t.containers(init=False):
            ports = {p["name"] for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe:
                    action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                    assert action["port"] in ports, f"{t.name}/{c['name']} {kind} port {action['port']} not in {ports}"
    for svc in find(objects, "Service"):
        matched = [t for t in templates if selects(svc["spec"]["selector"], t.labels)]
        assert matched, f"Service {svc['metadata']['name']} selects no pod"
        for t in matched:
            names = {p.get("name") for c in t.containers(init=False) for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in names, f"Service {svc['metadata']['name']}: {port} not a port of {t.name}"
    for monitor in find(objects, "PodMonitor"):
        matched = [t for t in templates if selects(monitor["spec"]["selector"]["matchLabels"], t.labels)]
        assert matched, f"PodMonitor {monitor['metadata']['name']} selects no pod"
        for t in matched:
            names = {p.get("name") for c in t.containers(init=False) for p in c.get("ports", [])}
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                assert endpoint["port"] in names, f"PodMonitor {monitor['metadata']['name']}: {endpoint} on {t.name}"


def _router_args(objects: list[dict]):
    from sglang_router.launch_router import parse_router_args

    router = one(objects, "Deployment", "minisgl-router")
    t = PodTemplate(router, "pod", router["spec"]["template"])
    c = t.container("router")
    return t, c, parse_router_args(module_args(expand(t, c, objects), "sglang_router.launch_router"))


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_router_discovers_exactly_the_serving_pods(path):
    """sglang-router's own parser reads the manifest's arguments: service discovery on, a selector
    that matches every engine (or LWS leader) pod and nothing else, their OpenAI port, its own
    namespace (the Role is namespaced), cache-aware routing, the engines' API key."""
    objects = render(path)
    router_t, router_c, args = _router_args(objects)
    assert args.service_discovery and args.policy == "cache_aware"
    serving = serving_templates(objects)
    assert serving
    for t in pod_templates(objects):
        assert selects(args.selector, t.labels) == (t.name in {s.name for s in serving}), \
            f"router selector {args.selector} vs {t.name}"
    for t in serving:
        engine = t.container("engine")
        openai_port = [p["containerPort"] for p in engine["ports"] if p["name"] == "openai"]
        from minisgl_backend.triton.supervise import parse_args

        supervisor = parse_args(module_args(expand(t, engine, objects), "minisgl_backend.triton.supervise"))
        assert openai_port == [args.service_discovery_port] == [supervisor.openai_port]
        # the frontend and the router hold the same key
        assert container_env(t, engine, objects)["MINISGL_API_KEY"] == args.api_key
    assert args.service_discovery_namespace == router_t.owner["metadata"]["namespace"] == "minisgl"
    ports = {p["name"]: p["containerPort"] for p in router_c["ports"]}
    assert ports["http"] == args.port and ports["metrics"] == args.prometheus_port
    assert args.api_key.startswith("<secret ")


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_router_may_watch_pods_in_its_namespace(path):
    objects = render(path)
    router = one(objects, "Deployment", "minisgl-router")
    account = router["spec"]["template"]["spec"]["serviceAccountName"]
    ns = router["metadata"]["namespace"]
    bindings = [b for b in find(objects, "RoleBinding")
                if any(s["kind"] == "ServiceAccount" and s["name"] == account and s.get("namespace") == ns
                       for s in b["subjects"])]
    assert bindings
    verbs = set()
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role" and b["metadata"]["namespace"] == ns
        for rule in one(objects, "Role", b["roleRef"]["name"])["rules"]:
            if "" in rule["apiGroups"] and "pods" in rule["resources"]:
                verbs |= set(rule["verbs"])
    assert {"get", "list", "watch"} <= verbs


@pytest.mark.parametrize("path", OVERLAYS)
def test_engine_commands_parse_and_fit_together(path, tmp_path):
    """The init container writes the model repository the supervisor serves (same emptyDir, same
    path); its settings are valid; the model path lies on the read-only model volume; the startup
    probe outlasts the supervisor's --ready-timeout and the grace period its stop sequence."""
    from minisgl_backend.config import AdapterConfig, EngineConfig, adapter_setting_names
    from minisgl_backend.triton.supervise import parse_args

    objects = render(path)
    for t in serving_templates(objects):
        init, engine = t.container("model-repository"), t.container("engine")
        words = module_args(expand(t, init, objects), "minisgl_backend.triton.repository")
        dest = words[0]
        settings = settings_of(words[1:])
        supervisor = parse_args(module_args(expand(t, engine, objects), "minisgl_backend.triton.supervise"))
        assert supervisor.model_repository == dest
        mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
        assert mounts[dest] == {m["mountPath"]: m["name"] for m in engine["volumeMounts"]}[dest]
        assert "emptyDir" in t.volume(mounts[dest])

        model = settings["model_path"]
        assert model == container_env(t, engine, objects)["MINISGL_MODEL_PATH"]
        model_mount = [m for m in engine["volumeMounts"] if model.startswith(m["mountPath"].rstrip("/") + "/")]
        assert len(model_mount) == 1 and model_mount[0].get("readOnly"), f"{t.name}: {model} on no read-only mount"
        shm = [m for m in engine["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and t.volume(shm[0]["name"])["emptyDir"]["medium"] == "Memory"

        adapter = {k: v for k, v in settings.items() if k in adapter_setting_names()}
        engine_settings = {k: v for k, v in settings.items() if k not in adapter}
        engine_settings["model_path"] = str(tmp_path)  # the folder is checked to exist
        EngineConfig.from_flat(engine_settings)
        AdapterConfig.from_flat(adapter)

        startup = engine["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] + startup.get("initialDelaySeconds", 0) \
            > supervisor.ready_timeout
        assert t.spec["terminationGracePeriodSeconds"] > supervisor.exit_timeout + 5


def test_the_base_settings_are_the_engine_defaults(tmp_path):
    """The base's minisgl-engine-settings repeat the engine's defaults (config.py), so a base
    without overlay changes nothing; the overlays' values are the only deviations."""
    from minisgl_backend.config import EngineConfig

    objects = render("base")
    (t,) = serving_templates(objects)
    settings = settings_of(module_args(expand(t, t.container("model-repository"), objects),
                                       "minisgl_backend.triton.repository")[1:])
    assert len(settings) > 5
    configured = EngineConfig.from_flat({**settings, "model_path": str(tmp_path)}).to_flat()
    assert configured == EngineConfig.from_flat(model_path=str(tmp_path)).to_flat()


def test_tp_size_is_the_gpu_count_of_a_replica():
    for path in GPU_OVERLAYS:
        objects = render(path)
        for t in serving_templates(objects):
            settings = settings_of(expand(t, t.container("model-repository"), objects))
            gpus = int(t.container("engine")["resources"]["limits"]["nvidia.com/gpu"])
            if t.owner["kind"] == "LeaderWorkerSet":
                worker = next(w for w in pod_templates(objects) if w.owner is t.owner and w.role == "worker")
                worker_gpus = int(worker.containers()[0]["resources"]["limits"]["nvidia.com/gpu"])
                size = t.owner["spec"]["leaderWorkerTemplate"]["size"]
                assert worker_gpus == gpus and size >= 2
                gpus += worker_gpus * (size - 1)
            assert int(settings["tp_size"]) == gpus, f"{path}: tp_size {settings['tp_size']} on {gpus} GPUs"
            assert settings["device"] == "cuda"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in t.spec["tolerations"]


def test_the_cpu_overlay_keeps_torch_threads_within_its_cores():
    objects = render("overlays/cpu")
    (t,) = serving_templates(objects)
    settings = settings_of(expand(t, t.container("model-repository"), objects))
    requested = float(t.container("engine")["resources"]["requests"]["cpu"])
    assert settings["device"] == "cpu"
    assert 1 <= int(settings["cpu_threads"]) * int(settings.get("tp_size", 1)) < requested
    assert "nvidia.com/gpu" not in str(objects)


def _engine_metric_kinds() -> dict[str, str]:
    """name -> kind of every metric family EngineMetrics creates."""
    from minisgl_backend.triton.metrics import EngineMetrics

    created: dict[str, str] = {}

    class Family:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

        def __init__(self, name, description, kind):
            created[name] = kind

        def Metric(self, labels, buckets=None):
            return object()

    EngineMetrics(type("Pb", (), {"MetricFamily": Family}), "minisgl", "1")
    return created


def _adapter_rules() -> list[dict]:
    configmap = one(render("prometheus-adapter"), "ConfigMap")
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"]


def _exposed_pod_metrics(rules: list[dict], series: list[str]) -> dict[str, str]:
    """custom metric name -> series, for each rule that selects the series by name, maps it to
    pods and renames it (prometheus-adapter's seriesQuery / resources / name.matches / name.as)."""
    exposed = {}
    for rule in rules:
        selector = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"])
        plain = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
        overrides = rule["resources"]["overrides"]
        assert overrides["pod"] == {"resource": "pod"} and overrides["namespace"] == {"resource": "namespace"}
        assert 'pod!=""' in rule["seriesQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert "by (<<.GroupBy>>)" in rule["metricsQuery"]
        for name in series:
            if (selector and re.fullmatch(selector.group(1), name)) or (plain and plain.group(1) == name):
                matches = re.search(rule["name"]["matches"], name)
                if matches:
                    go_template = rule["name"].get("as", "$1").replace("${", "\\g<").replace("}", ">")
                    exposed[matches.expand(re.sub(r"\$(\d+)", r"\\g<\1>", go_template))] = name
    return exposed


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_hpa_scales_on_a_gauge_the_pods_export(path):
    objects = render(path)
    hpa = one(objects, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    kinds = _engine_metric_kinds()
    assert kinds.get(name) == "gauge", f"{name} is not a gauge of EngineMetrics: {kinds}"
    exposed = _exposed_pod_metrics(_adapter_rules(), sorted(kinds))
    assert exposed.get(name) == name, f"prometheus-adapter serves {sorted(exposed)}"
    # every metric the rule serves is a gauge (a counter would need rate())
    assert all(kinds[series] == "gauge" for series in exposed.values())
    # the HPA's target is in the rendering, and the PodMonitor scrapes its serving pods
    ref = hpa["spec"]["scaleTargetRef"]
    target = one(objects, ref["kind"], ref["name"])
    assert target["apiVersion"] == ref["apiVersion"]
    assert "replicas" not in target["spec"], "the HPA owns the replica count; an apply would reset it"
    targets = [t for t in serving_templates(objects) if t.owner is target]
    assert targets
    monitor = one(objects, "PodMonitor", "minisgl-engine")
    assert all(selects(monitor["spec"]["selector"]["matchLabels"], t.labels) for t in targets)
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_adapter_rule_selects_by_name_not_by_accident():
    """The rule's name filter is real: a counter of the engine is not served, a gauge is."""
    exposed = _exposed_pod_metrics(_adapter_rules(), ["minisgl_prompt_tokens_total", "minisgl_num_requests_pending"])
    assert exposed == {"minisgl_num_requests_pending": "minisgl_num_requests_pending"}


def test_the_helm_values_carry_the_same_rules():
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    assert values["rules"]["custom"] == _adapter_rules()


def test_the_multinode_group_is_wired_to_one_rendezvous(tmp_path):
    objects = render("overlays/multinode-gpu")
    (lws,) = find(objects, "LeaderWorkerSet")
    assert not find(objects, "Deployment", "minisgl-engine"), "the LeaderWorkerSet replaces the engine Deployment"
    lwt = lws["spec"]["leaderWorkerTemplate"]
    # the ranks of one model fail together
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    # the controller's headless Service carries the LeaderWorkerSet's name: no other Service may
    assert lws["metadata"]["name"] not in {s["metadata"]["name"] for s in find(objects, "Service")}
    leader, worker = [t for t in pod_templates(objects) if t.owner is lws]
    assert (leader.role, worker.role) == ("leader", "worker")

    leader_settings = settings_of(expand(leader, leader.container("model-repository"), objects))
    assert leader_settings["nnodes"] == str(lwt["size"]) and leader_settings["node_rank"] == "0"
    head, _, port = leader_settings["dist_init_addr"].rpartition(":")
    assert head == leader.lws_env()["LWS_LEADER_ADDRESS"]
    assert int(port) in [p["containerPort"] for p in leader.container("engine")["ports"] if p["name"] == "dist-init"]

    (node,) = worker.containers()
    args = module_args(expand(worker, node, objects), "minisgl_backend.node")
    raw = [*node.get("command", []), *node.get("args", [])]
    assert "--node-rank=$(LWS_WORKER_INDEX)" in raw and "--nnodes=$(LWS_GROUP_SIZE)" in raw
    assert f"--dist-init-addr={leader_settings['dist_init_addr']}" in args
    assert f"--model={leader_settings['model_path']}" in args
    # node 0 admits the worker: the check it runs on a joining node (same settings, same model)
    from minisgl_backend.config import EngineConfig, adapter_setting_names
    from minisgl_backend.distributed.fingerprint import fingerprint_mismatch, node_fingerprint
    from minisgl_backend.node import parse_args as node_args

    model = str(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    worker_config = node_args([f"--model={model}" if a.startswith("--model=") else a for a in args])
    assert worker_config.parallel.node_rank == 1 and worker_config.parallel.nnodes == lwt["size"]
    leader_config = EngineConfig.from_flat({**{k: v for k, v in leader_settings.items()
                                               if k not in adapter_setting_names()}, "model_path": model})
    assert leader_config.parallel.node_rank == 0
    assert fingerprint_mismatch(node_fingerprint(leader_config), node_fingerprint(worker_config), 1) is None
    # ... and every setting of node 0's repository reaches the workers, node-local ones included
    worker_settings = worker_config.to_flat()
    differs = {k for k, v in leader_config.to_flat().items() if worker_settings[k] != v}
    assert differs == {"node_rank"}, differs
    for t, c in ((leader, leader.container("engine")), (worker, node)):
        env = container_env(t, c, objects)
        assert env.get("NCCL_SOCKET_IFNAME") and env.get("GLOO_SOCKET_IFNAME"), f"{t.name}: NCCL/gloo interface"
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])


def test_images_match_their_dockerfiles_and_the_docs():
    docs = DOCS.read_text()
    for path in OVERLAYS:
        objects = render(path)
        images = {c["image"] for t in pod_templates(objects) for c in t.containers()}
        router_image = one(objects, "Deployment", "minisgl-router")["spec"]["template"]["spec"]["containers"][0]["image"]
        engine_images = images - {router_image}
        assert len(engine_images) == 1, f"{path}: one engine image everywhere, got {engine_images}"
        assert f"docker build -t {engine_images.pop()} ." in docs
        assert f"-t {router_image} " in docs
    # the router image is the sglang-router whose parser checked the flags above
    version = re.search(r"^ARG SGLANG_ROUTER_VERSION=(\S+)$", (ROOT / "deploy" / "router.Dockerfile").read_text(), re.M)
    assert version and router_image == f"minisgl-router:{version.group(1)}"
    assert importlib.metadata.version("sglang-router") == version.group(1)


@pytest.mark.parametrize("path", OVERLAYS)
def test_a_registry_image_reaches_every_engine_container(path, tmp_path):
    """`kustomize edit set image` (docs/deploy.md) rewrites the engine image everywhere, the
    LeaderWorkerSet's templates included."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(DEPLOY / path, tmp_path)],  # kustomize takes relative paths only
        "images": [{"name": "minisgl-triton", "newName": "registry.example.com/minisgl-triton", "newTag": "9.9"}]}))
    out = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    images = [c["image"] for t in pod_templates(objects) for c in t.containers() if "minisgl-triton" in c["image"]]
    assert images and set(images) == {"registry.example.com/minisgl-triton:9.9"}


def test_the_docs_show_every_kustomization():
    docs = DOCS.read_text()
    for path in KUSTOMIZATIONS:
        assert f"kubectl apply -k deploy/k8s/{path}" in docs, path
    for heading in ("## Kubernetes", "## Multi-node (LeaderWorkerSet and by hand)"):
        assert heading in docs
    assert "docs/deploy.md" in (ROOT / "README.md").read_text()


def iter_yaml_files() -> Iterator[Path]:
    yield from sorted(DEPLOY.rglob("*.yaml"))


def test_no_stray_manifest():
    """Every YAML file under deploy/k8s is a kustomization, a resource or patch one of them names,
    or a file the docs name (a manifest nobody renders is never checked)."""
    named: set[Path] = set()
    for k in DEPLOY.rglob("kustomization.yaml"):
        named.add(k)
        spec = yaml.safe_load(k.read_text())
        for entry in (*spec.get("resources", []), *spec.get("configurations", []),
                      *(p["path"] for p in spec.get("patches", []) if "path" in p)):
            named.add((k.parent / entry).resolve())
    docs = DOCS.read_text()
    stray = [p for p in iter_yaml_files()
             if p.resolve() not in named and p not in named and str(p.relative_to(ROOT)) not in docs]
    assert not stray, stray


# ---------------------------------------------------------------- the CPU pod, run here


def _http(method: str, url: str, body: dict | None = None, key: str | None = None,
          timeout: float = 60.0) -> tuple[int, str]:
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


class _Pod:
    """The commands of a rendered pod template, run on this machine: volumes as local folders,
    container ports on free ports, `python3` as this interpreter."""

    def __init__(self, template: PodTemplate, objects: list[dict], volumes: dict[str, Path],
                 overrides: dict[str, str]) -> None:
        import sys

        from minisgl_backend.ports import free_ports

        self.template, self.objects, self.overrides = template, objects, overrides
        ports = sorted({p["containerPort"] for c in template.containers() for p in c.get("ports", [])})
        self.ports = dict(zip(ports, free_ports(len(ports))))
        self.mounts = {m["mountPath"]: volumes[m["name"]] for c in template.containers()
                       for m in c.get("volumeMounts", []) if m["name"] in volumes}
        self.python = sys.executable

    def port(self, container: dict, name_or_number) -> int:
        number = next((p["containerPort"] for p in container["ports"] if p.get("name") == name_or_number),
                      name_or_number)
        return self.ports[number]

    def words(self, container: dict) -> list[str]:
        words = expand(self.template, container, self.objects, self.overrides)
        out = []
        for w in words:
            for mount in sorted(self.mounts, key=len, reverse=True):
                w = re.sub(rf"(?<![\w-]){re.escape(mount)}(?=/|$)", str(self.mounts[mount]), w)
            m = re.fullmatch(r"(--[\w-]*port)=(\d+)", w)
            if m and int(m.group(2)) in self.ports:
                w = f"{m.group(1)}={self.ports[int(m.group(2))]}"
            out.append(w)
        assert out[0] in ("python3", "python")
        return [self.python, *out[1:]]


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.timeout(600)
def test_the_cpu_pod_answers_its_probes_monitor_and_router(tiny_llama, tmp_path, require_triton):
    """The engine pod of overlays/cpu, its init container and its container run here as the
    manifest says (a tiny model in place of SmolLM2): every probe answers 200 on its port, the
    PodMonitor's endpoint exports the HPA's gauge, /v1 needs the Secret's key; then sglang-router
    with the manifest's flags (its worker given by URL instead of discovered) serves the pod and
    requires the same key; SIGTERM stops the pod within its grace period."""
    import signal
    import time

    objects = render("overlays/cpu")
    (t,) = serving_templates(objects)
    settings_env = container_env(t, t.container("model-repository"), objects)
    models = tmp_path / "models"
    models.mkdir()
    model_path = settings_env["MINISGL_MODEL_PATH"]
    (models / Path(model_path).relative_to("/models")).symlink_to(tiny_llama, target_is_directory=True)
    key = "test-key-0123"
    overrides = {"MAX_TOTAL_TOKENS": "4096", "CPU_THREADS": "2"}
    pod = _Pod(t, objects, {"models": models, "model-repository": tmp_path / "model-repository"}, overrides)
    env = {**os.environ, "MINISGL_API_KEY": key, "MINISGL_MODEL_PATH": str(models / Path(model_path).name)}

    init = subprocess.run(pod.words(t.container("model-repository")), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    engine = t.container("engine")
    log = open(tmp_path / "engine.log", "wb")
    procs = [subprocess.Popen(pod.words(engine), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)]
    try:
        startup = engine["startupProbe"]["httpGet"]
        url = f"http://127.0.0.1:{pod.port(engine, startup['port'])}{startup['path']}"
        deadline = time.monotonic() + 300
        while _http("GET", url, timeout=5)[0] != 200:
            assert procs[0].poll() is None, (tmp_path / "engine.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the startup probe never passed"
            time.sleep(1)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = engine[kind]["httpGet"]
            status, _ = _http("GET", f"http://127.0.0.1:{pod.port(engine, probe['port'])}{probe['path']}")
            assert status == 200, f"{kind} {probe}"
        monitor = one(objects, "PodMonitor", "minisgl-engine")["spec"]["podMetricsEndpoints"][0]
        status, text = _http("GET", f"http://127.0.0.1:{pod.port(engine, monitor['port'])}{monitor['path']}")
        metric = one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
        assert status == 200 and f"# TYPE {metric} gauge" in text
        assert re.search(rf"^{metric}{{[^}}]*}} \d", text, re.M), f"no sample of {metric}"

        openai = f"http://127.0.0.1:{pod.port(engine, 'openai')}/v1/completions"
        request = {"model": "minisgl", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        assert _http("POST", openai, request)[0] == 401
        assert _http("POST", openai, request, key=key)[0] == 200

        # the router: the manifest's flags, discovery replaced by the pod's URL
        router_obj = one(objects, "Deployment", "minisgl-router")
        rt = PodTemplate(router_obj, "pod", router_obj["spec"]["template"])
        rc = rt.container("router")
        rpod = _Pod(rt, objects, {}, {"MINISGL_API_KEY": key})
        words, skip = [], 0
        for w in rpod.words(rc):
            if w in ("--service-discovery", "--selector") or w.startswith("--service-discovery-"):
                skip = 1 if w == "--selector" else 0  # --selector takes one label here
                continue
            if skip:
                skip -= 1
                continue
            words.append(w)
        words += ["--worker-urls", f"http://127.0.0.1:{pod.port(engine, 'openai')}"]
        rlog = open(tmp_path / "router.log", "wb")
        procs.append(subprocess.Popen(words, cwd=tmp_path, stdout=rlog, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True))
        ready = rc["readinessProbe"]["httpGet"]
        ready_url = f"http://127.0.0.1:{rpod.port(rc, ready['port'])}{ready['path']}"
        deadline = time.monotonic() + 120
        while _http("GET", ready_url, timeout=5)[0] != 200:
            assert procs[1].poll() is None, (tmp_path / "router.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the router never became ready"
            time.sleep(1)
        live = rc["livenessProbe"]["httpGet"]
        assert _http("GET", f"http://127.0.0.1:{rpod.port(rc, live['port'])}{live['path']}")[0] == 200
        routed = f"http://127.0.0.1:{rpod.port(rc, 'http')}/v1/completions"
        assert _http("POST", routed, request)[0] == 401
        status, body = _http("POST", routed, request, key=key)
        assert status == 200, body

        # the pod's stop: SIGTERM, gone within terminationGracePeriodSeconds
        procs[0].send_signal(signal.SIGTERM)
        procs[0].wait(timeout=t.spec["terminationGracePeriodSeconds"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
