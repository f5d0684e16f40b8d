#!/usr/bin/env python3
"""Prove that scripts/check_ops.sh fails on broken operations files.

    python3 scripts/check_ops_selftest.py [-k SUBSTRING] [-v]

Copies the project's files (tracked and untracked-but-not-ignored, without tests/) to a scratch
folder, first checks that check_ops.sh passes there, then applies one breakage at a time (each a
text replacement in one file) and requires check_ops.sh to exit non-zero with the expected
message. Uses the same virtualenv (${R2F_VENV:-.venv}), so run scripts/check_ops.sh once first.
About 1-2 s per case.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (name, file, old text, new text, regex the failing output must contain)
CASES = [
    # promtool check rules
    ("alert PromQL syntax error", "dashboards/alerts.yml",
     "(time() - r2f_job_started_timestamp_seconds) > 600", "(time() - r2f_job_started_timestamp_seconds > 600",
     r"FAILED|parse error|unclosed"),
    ("alert with unknown rule field", "dashboards/alerts.yml",
     "        for: 20m\n", "        for: 20m\n        keep_firing: 5m\n", r"FAILED|field keep_firing not found"),
    # promtool test rules
    ("alert threshold no longer fires in its unit test", "dashboards/alerts.yml",
     "(time() - r2f_job_started_timestamp_seconds) > 600", "(time() - r2f_job_started_timestamp_seconds) > 6000",
     r"FAILED:[\s\S]*R2fJobStuck"),
    ("alert that would fire on healthy series", "dashboards/alerts.yml",
     "queue!~\".+[.]dead\"}) > 0\n        for: 15m",
     "queue!~\".+[.]dead\"}) > 5\n        for: 15m",
     r"FAILED:[\s\S]*R2fQueueNoConsumers"),
    # check_dashboards.py: alert annotations
    ("alert without runbook", "dashboards/alerts.yml",
     '          runbook: "README.md#runbook-r2fllmerrorratiohigh"\n', "",
     r"R2fLlmErrorRatioHigh: missing annotation runbook"),
    ("alert with a bad severity", "dashboards/alerts.yml",
     "          severity: warning\n        annotations:\n          summary: \"r2f: metrics endpoint",
     "          severity: high\n        annotations:\n          summary: \"r2f: metrics endpoint",
     r"R2fWorkerDown: labels.severity"),
    ("runbook anchor missing from README.md", "README.md",
     '<a id="runbook-r2fplancacheerrors"></a>\n### R2fPlanCacheErrors', "### Plan cache errors",
     r"no anchor runbook-r2fplancacheerrors"),
    # yamllint
    ("YAML indentation", "deploy/k8s/base/service.yaml",
     "  clusterIP: None\n", "  clusterIP: None\n   publishNotReadyAddresses: true\n", r"service.yaml"),
    ("YAML trailing spaces", "deploy/local/docker-compose.yml",
     "name: r2f\n", "name: r2f   \n", r"trailing-spaces"),
    ("YAML duplicate key", "dashboards/provisioning/datasources.yaml",
     "    isDefault: true\n", "    isDefault: true\n    isDefault: false\n", r"key-duplicates|duplication of key"),
    # hadolint
    ("Dockerfile lint (cd inside RUN)", "deploy/Dockerfile",
     "WORKDIR /src\n", "WORKDIR /src\nRUN cd /tmp && ls\n", r"DL3003"),
    # check_deploy.py: Kubernetes core kinds (kubernetes-validate, strict)
    ("Deployment field typo", "deploy/k8s/worker/deployment.yaml",
     "      terminationGracePeriodSeconds: 360\n", "      terminationGracePeriodSecond: 360\n",
     r"Additional properties are not allowed .*terminationGracePeriodSecond"),
    ("Deployment wrong type", "deploy/k8s/worker/deployment.yaml",
     "            failureThreshold: 90\n", "            failureThreshold: ninety\n", r"'ninety' is not of type 'integer'"),
    ("PDB wrong apiVersion field", "deploy/k8s/worker/pdb.yaml",
     "  maxUnavailable: 1\n", "  maxUnavailable: 1\n  minAvailble: 1\n", r"PodDisruptionBudget r2f-worker"),
    # check_deploy.py: semantics
    ("grace period shorter than the drain", "deploy/k8s/worker/deployment.yaml",
     "      terminationGracePeriodSeconds: 360\n", "      terminationGracePeriodSeconds: 120\n",
     r"terminationGracePeriodSeconds 120 must exceed the drain timeout 300 s plus stop_grace_secs 30"),
    ("drain timeout raised above the grace period", "deploy/k8s/base/config.toml",
     "drain_timeout_secs = 300", "drain_timeout_secs = 900",
     r"must exceed the drain timeout 900"),
    ("stop grace leaves no room in the grace period", "deploy/k8s/base/config.toml",
     "stop_grace_secs = 30", "stop_grace_secs = 60",
     r"must exceed the drain timeout 300 s plus stop_grace_secs 60"),
    ("no GPU limit", "deploy/k8s/worker/deployment.yaml",
     "              nvidia.com/gpu: 1\n", "", r"limits nvidia.com/gpu: 1"),
    ("GPU taint not tolerated", "deploy/k8s/worker/deployment.yaml",
     "        - key: nvidia.com/gpu\n", "        - key: gpu\n", r"nvidia.com/gpu:NoSchedule taint"),
    ("readiness on /healthz", "deploy/k8s/worker/deployment.yaml",
     "              path: /readyz\n", "              path: /healthz\n", r"readinessProbe must GET /readyz"),
    ("secret as a literal env value", "deploy/k8s/worker/deployment.yaml",
     "            - name: R2F__AMQP__URL\n              valueFrom:\n                secretKeyRef:\n"
     "                  name: r2f-secrets\n                  key: amqp-url\n",
     "            - name: R2F__AMQP__URL\n              value: amqp://guest:guest@rabbitmq:5672/%2f\n",
     r"R2F__AMQP__URL must come from a secretKeyRef"),
    ("Secret committed into the base", "deploy/k8s/base/keda.yaml",
     "      key: host\n",
     "      key: host\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: r2f-secrets\n"
     "stringData:\n  amqp-url: amqp://r2f:pw@rabbitmq/%2f\n",
     r"renders Secret r2f-secrets"),
    ("config not valid TOML", "deploy/k8s/base/config.toml",
     'default_model = "sd3"', 'default_model = sd3', r"not valid TOML"),
    ("Service selects nothing", "deploy/k8s/base/service.yaml",
     "  selector:\n    app.kubernetes.io/name: r2f\n", "  selector:\n    app.kubernetes.io/name: r2f-x\n",
     r"no Service selects the worker pods"),
    # check_deploy.py: custom resources (JSON schemas) and KEDA semantics
    ("ScaledObject field typo", "deploy/k8s/worker/scaledobject.yaml",
     "  pollingInterval: 15\n", "  pollingIntervall: 15\n", r"ScaledObject r2f-worker.*pollingIntervall"),
    ("KEDA trigger value not a string", "deploy/k8s/worker/scaledobject.yaml",
     '        value: "1"\n', "        value: 1\n", r"triggers/0/metadata/value: 1 is not of type 'string'"),
    ("KEDA trigger on amqp (ignores unacked jobs)", "deploy/k8s/worker/scaledobject.yaml",
     "        protocol: http\n", "        protocol: amqp\n", r"must use protocol http and mode QueueLength"),
    ("KEDA trigger on another queue", "deploy/k8s/worker/scaledobject.yaml",
     "        queueName: r2f.jobs.sd3\n", "        queueName: r2f.jobs\n", r"no trigger on amqp.jobs_queue r2f.jobs.sd3"),
    ("KEDA without the inbox trigger", "deploy/k8s/worker/scaledobject.yaml",
     "        queueName: r2f.jobs\n", "        queueName: r2f.jobz\n", r"no trigger on the inbox r2f.jobs"),
    ("KEDA inbox trigger that drives the scale", "deploy/k8s/worker/scaledobject.yaml",
     '        value: "1000"\n', '        value: "1"\n', r"inbox trigger's value must be large"),
    ("TriggerAuthentication without key", "deploy/k8s/base/keda.yaml",
     "      key: host\n", "", r"TriggerAuthentication r2f-rabbitmq.*'key' is a required property"),
    ("ServiceMonitor bad interval", "deploy/k8s/base/servicemonitor.yaml",
     "      interval: 15s\n", "      interval: 15 seconds\n", r"ServiceMonitor r2f-worker.*interval"),
    ("ServiceMonitor on a port the Service lacks", "deploy/k8s/base/servicemonitor.yaml",
     "    - port: metrics\n", "    - port: http\n", r"endpoint port http is not a Service port name"),
    ("SDXL workers scaled on the SD3 queue", "deploy/k8s/models/sdxl/kustomization.yaml",
     "        value: r2f.jobs.sdxl\n", "        value: r2f.jobs.sd3\n",
     r"trigger queueName r2f.jobs.sd3 is neither amqp.jobs_queue r2f.jobs.sdxl"),
    ("model label left out of the selectors", "deploy/k8s/models/sdxl/kustomization.yaml",
     "      r2f.io/model: sdxl\n    includeSelectors: true\n",
     "      r2f.io/model: sdxl\n    includeSelectors: false\n",
     r"selects the pods of r2f-worker-sdxl"),
    ("model without a [models] entry", "deploy/k8s/base/config.toml",
     "[models.sdxl]\n", "[models.sdxl-old]\n", r"serves model sdxl, which has no \[models.sdxl\]"),
    ("overlay PVC missing", "deploy/k8s/overlays/production/kustomization.yaml",
     "  - pvc.yaml\n", "", r"uses PVC r2f-model-cache, not in the rendering"),
    ("manifest left out of the kustomization", "deploy/k8s/worker/kustomization.yaml",
     "  - pdb.yaml\n", "", r"pdb.yaml: not listed in its kustomization.yaml"),
    ("image config with credentials", "deploy/config.toml",
     "[storage]\n", "[amqp]\nurl = \"amqp://r2f:secret@rabbitmq:5672/%2f\"\n\n[storage]\n",
     r"amqp.url holds credentials"),
    # check_deploy.py: compose, Dockerfile, .dockerignore
    ("compose depends on an unknown service", "deploy/local/docker-compose.yml",
     "      minio-init:\n        condition: service_completed_successfully\n",
     "      minio-setup:\n        condition: service_completed_successfully\n", r"depends_on unknown service minio-setup"),
    ("compose key typo (compose-spec schema)", "deploy/local/docker-compose.yml",
     "    stop_grace_period: 360s\n", "    stop_grace_periods: 360s\n", r"stop_grace_periods' was unexpected"),
    ("compose without GPU reservation", "deploy/local/docker-compose.yml",
     "            - driver: nvidia\n", "            - driver: amd\n", r"reserves no NVIDIA GPU"),
    ("compose mounts a missing file", "deploy/local/docker-compose.yml",
     "./r2f.toml:/etc/r2f/config.toml:ro", "./worker.toml:/etc/r2f/config.toml:ro",
     r"bind mount source ./worker.toml missing"),
    ("Grafana dashboard mounted outside the provisioned path", "deploy/local/docker-compose.yml",
     "../../dashboards/r2f.json:/etc/grafana/dashboards/r2f/r2f.json:ro",
     "../../dashboards/r2f.json:/var/lib/grafana/r2f.json:ro", r"grafana does not mount dashboards/r2f.json"),
    ("Prometheus scrapes RabbitMQ without per-object metrics", "deploy/local/prometheus.yml",
     "    metrics_path: /metrics/per-object\n", "", r"/metrics/per-object"),
    ("Prometheus config invalid", "deploy/local/prometheus.yml",
     "  scrape_interval: 15s\n", "  scrape_interval: 15\n", r"FAILED|not a valid duration"),
    ("Dockerfile runs as root", "deploy/Dockerfile",
     "USER 10001:10001\n", "USER root\n", r"DL3002|non-root USER"),
    ("Dockerfile CMD differs from the contract", "deploy/Dockerfile",
     'CMD ["worker", "--config", "/etc/r2f/config.toml"]', 'CMD ["worker"]', r"CMD must be"),
    (".dockerignore drops src/", ".dockerignore", "!src/\n", "", r"COPY source src is excluded"),
    # check_dashboards.py + promtool on the dashboard queries
    ("dashboard import placeholder", "dashboards/r2f.json",
     '"uid": "${datasource}"', '"uid": "${DS_PROMETHEUS}"', r"\$\{DS_"),
    ("dashboard duplicate panel id", "dashboards/r2f.json", '"id": 3,', '"id": 2,', r"id 2 already used"),
    ("dashboard panel on a fixed datasource", "dashboards/r2f.json",
     '"datasource": {\n        "type": "prometheus",\n        "uid": "${datasource}"\n      },\n      "gridPos": {\n        "h": 4',
     '"datasource": {\n        "type": "prometheus",\n        "uid": "prometheus"\n      },\n      "gridPos": {\n        "h": 4',
     r"datasource must be"),
    ("dashboard empty query", "dashboards/r2f.json",
     '"expr": "sum(r2f_jobs_in_progress{namespace=~\\"$namespace\\", instance=~\\"$instance\\"})"',
     '"expr": ""', r"empty expr"),
    ("dashboard unknown variable", "dashboards/r2f.json",
     'rabbitmq_queue_messages_unacked{queue=~\\"$jobs_queue\\"', 'rabbitmq_queue_messages_unacked{queue=~\\"$job_queue\\"',
     r"unknown variable \$job_queue"),
    ("dashboard PromQL syntax error", "dashboards/r2f.json",
     '"expr": "sum(r2f_jobs_in_progress{namespace=~\\"$namespace\\", instance=~\\"$instance\\"})"',
     '"expr": "sum(r2f_jobs_in_progress{namespace=~\\"$namespace\\", instance=~\\"$instance\\"}"',
     r"FAILED|unclosed|parse error"),
    ("dashboard overlapping panels", "dashboards/r2f.json",
     '"h": 4,\n        "w": 4,\n        "x": 4,', '"h": 4,\n        "w": 4,\n        "x": 2,', r"overlaps panel"),
    ("dashboard not JSON", "dashboards/r2f.json", '"panels": [', '"panels": [,', r"cannot be read as JSON"),
    # The gateway (`r2f gateway`): check_deploy.py on its manifests, overlays and compose service
    ("gateway grace period not above drain_secs", "deploy/k8s/gateway/deployment.yaml",
     "      terminationGracePeriodSeconds: 45\n", "      terminationGracePeriodSeconds: 30\n",
     r"terminationGracePeriodSeconds 30 must exceed gateway.drain_secs 30"),
    ("gateway asks for a GPU", "deploy/k8s/gateway/deployment.yaml",
     "            limits:\n              memory: 512Mi\n",
     "            limits:\n              memory: 512Mi\n              nvidia.com/gpu: 1\n",
     r"container r2f must not request nvidia.com/gpu"),
    ("gateway readiness on /healthz", "deploy/k8s/gateway/deployment.yaml",
     "              path: /readyz\n", "              path: /healthz\n", r"readinessProbe must GET /readyz on port 8080"),
    ("gateway.listen off the container port", "deploy/k8s/base/config.toml",
     'listen = "0.0.0.0:8080"', 'listen = "0.0.0.0:8081"', r"gateway.listen port 8081 is not a container port"),
    ("gateway gets the LLM key", "deploy/k8s/gateway/deployment.yaml",
     "            - name: R2F__REDIS__URL\n",
     "            - name: OPENAI_API_KEY\n              valueFrom:\n                secretKeyRef:\n"
     "                  name: r2f-secrets\n                  key: openai-api-key\n"
     "            - name: R2F__REDIS__URL\n",
     r"env OPENAI_API_KEY: the gateway must not get the LLM key"),
    ("API key file not projected from the Secret", "deploy/k8s/base/config.toml",
     'api_key_files = ["/etc/r2f/keys/api.keys"]', 'api_key_files = ["/etc/r2f/keys/acme.keys"]',
     r"API key file /etc/r2f/keys/acme.keys is not provided by a Secret"),
    ("workers' patch reaches the gateway", "deploy/k8s/overlays/production/kustomization.yaml",
     "      labelSelector: app.kubernetes.io/component=worker\n", "",
     r"volume model-cache is declared but not mounted"),
    ("gateway on another bucket than the workers", "deploy/k8s/overlays/production/patch-gateway.yaml",
     "              value: r2f-production\n", "              value: r2f-prod\n",
     r"R2F__STORAGE__BUCKET is 'r2f-prod' but 'r2f-production' on Deployment r2f-worker"),
    ("gateway HPA below two replicas", "deploy/k8s/overlays/staging/patch-gateway-hpa.yaml",
     "  minReplicas: 2\n", "  minReplicas: 1\n", r"minReplicas 1: keep at least 2 gateways"),
    ("HPA aimed at a worker", "deploy/k8s/gateway/hpa.yaml",
     "    name: r2f-gateway\n  minReplicas", "    name: r2f-worker\n  minReplicas",
     r"HorizontalPodAutoscaler r2f-gateway targets Deployment r2f-worker"),
    ("NetworkPolicy admits another port", "deploy/k8s/gateway/networkpolicy.yaml",
     "          port: 8080\n", "          port: 8081\n", r"admit no ingress on port 8080"),
    ("NetworkPolicy blocks Redis", "deploy/k8s/gateway/networkpolicy.yaml",
     "          port: 6379\n", "          port: 6380\n", r"block egress to Redis"),
    ("gateway manifest left out of its kustomization", "deploy/k8s/gateway/kustomization.yaml",
     "  - networkpolicy.yaml\n", "", r"networkpolicy.yaml: not listed in its kustomization.yaml"),
    ("compose gateway stopped before its drain", "deploy/local/docker-compose.yml",
     "    stop_grace_period: 45s\n", "    stop_grace_period: 10s\n",
     r"service gateway: stop_grace_period must exceed gateway.drain_secs 30"),
    ("compose gateway healthcheck on the worker's port", "deploy/local/docker-compose.yml",
     "http://127.0.0.1:8080/readyz", "http://127.0.0.1:9464/readyz",
     r"needs a healthcheck on /readyz or /healthz at port 8080"),
    ("Prometheus scrapes the gateway on the wrong port", "deploy/local/prometheus.yml",
     '      - targets: ["gateway:8080"]\n', '      - targets: ["gateway:9464"]\n',
     r"does not scrape the gateway at gateway:8080"),
    # The gateway's alerts and dashboard row
    ("gateway 5xx alert no longer fires in its unit test", "dashboards/alerts.yml",
     "          ) > 0.05\n", "          ) > 0.5\n", r"FAILED:[\s\S]*R2fGatewayErrorRatioHigh"),
    ("worker-down alert fires for the gateway", "dashboards/alerts.yml",
     'up{job=~"r2f.*", job!~"r2f-gateway.*"} == 0', 'up{job=~"r2f.*"} == 0', r"FAILED:[\s\S]*R2fWorkerDown"),
    ("gateway panel on an unknown variable", "dashboards/r2f.json",
     'tenant=~\\"$tenant\\"', 'tenant=~\\"$tenants\\"', r"unknown variable \$tenants"),
]


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if f and not f.startswith(("tests/", "target/"))
            and os.path.isfile(os.path.join(ROOT, f))]


def copy_tree(files: list[str], dest: str) -> None:
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def run_checks(tree: str) -> tuple[int, str]:
    env = dict(os.environ, R2F_VENV=os.environ.get("R2F_VENV", os.path.join(ROOT, ".venv")))
    p = subprocess.run(["bash", os.path.join(tree, "scripts", "check_ops.sh")], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", help="only the cases whose name contains this")
    ap.add_argument("-v", action="store_true", help="print the output of failing checks")
    args = ap.parse_args()
    files = project_files()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="r2f-ops-selftest-") as scratch:
        pristine = os.path.join(scratch, "pristine")
        copy_tree(files, pristine)
        rc, out = run_checks(pristine)
        if rc != 0:
            print(out)
            print("selftest: check_ops.sh fails on the unmodified files; fix that first")
            return 1
        cases = [c for c in CASES if not args.k or args.k in c[0]]
        for i, (name, path, old, new, expect) in enumerate(cases):
            tree = os.path.join(scratch, f"case{i}")
            shutil.copytree(pristine, tree)
            target = os.path.join(tree, path)
            with open(target, encoding="utf-8") as f:
                text = f.read()
            if text.count(old) < 1:
                print(f"STALE  {name}: the text to break is no longer in {path}")
                failures += 1
                continue
            with open(target, "w", encoding="utf-8") as f:
                f.write(text.replace(old, new, 1))
            rc, out = run_checks(tree)
            if rc != 0 and re.search(expect, out):
                last = [ln for ln in out.splitlines() if ln.startswith("== ")][-1][3:]
                print(f"ok     {name}  (failed in: {last})")
            else:
                failures += 1
                why = "passed" if rc == 0 else f"failed without /{expect}/"
                print(f"MISSED {name}: check_ops.sh {why}")
                if args.v:
                    print(out)
            shutil.rmtree(tree)
    print(f"selftest: {len(cases) - failures} of {len(cases)} breakages caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
