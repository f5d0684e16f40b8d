#!/usr/bin/env python3
"""Offline checks of the Grafana dashboard, its provisioning files and the alert rules.

    python3 scripts/check_dashboards.py [--metrics-out FILE] [--promql-out FILE]

- dashboards/r2f.json: uid, title, a `datasource` template variable (type datasource, query
  prometheus), no `${DS_...}` import placeholders or __inputs, unique panel ids, a gridPos inside
  the 24-column grid on every panel with no two panels overlapping, every non-row panel and every
  target on {"type": "prometheus", "uid": "${datasource}"}, non-empty `expr` on every target, and
  every $variable used in a query defined by the dashboard or built into Grafana.
- dashboards/provisioning/{datasources,dashboards}.yaml: the fields Grafana needs.
- dashboards/alerts.yml: every alert has labels.severity (critical|warning|info) and annotations
  summary, description and runbook, the runbook being README.md#runbook-<alertname lowercased>
  with that anchor present in README.md (its operations section).
- --metrics-out FILE: every metric name (r2f_* and rabbitmq_*) used in the dashboard queries and
  the alert expressions, histogram suffixes _bucket/_sum/_count removed, sorted, one per line.
- --promql-out FILE: the dashboard queries (variables replaced by sample values) written as a
  Prometheus recording-rules file, so that `promtool check rules FILE` parses every query.

Exits 1 and lists every problem found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

try:
    import yaml
except ImportError:  # PyYAML lives in the project's virtualenv (scripts/check_ops.sh installs it)
    _venv_py = os.path.join(os.environ.get("R2F_VENV") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", ".venv"), "bin", "python")
    if os.path.exists(_venv_py) and os.path.realpath(_venv_py) != os.path.realpath(sys.executable):
        os.execv(_venv_py, [_venv_py, *sys.argv])
    raise

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DASHBOARD = os.path.join(ROOT, "dashboards", "r2f.json")
ALERTS = os.path.join(ROOT, "dashboards", "alerts.yml")
PROVISIONING = os.path.join(ROOT, "dashboards", "provisioning")
OPERATIONS_DOC = os.path.join(ROOT, "README.md")

DS_REF = {"type": "prometheus", "uid": "${datasource}"}
METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])((?:r2f|rabbitmq)_[a-z0-9_]+)")
VAR_RE = re.compile(r"\$(?:\{([A-Za-z0-9_]+)(?::[a-z]+)?\}|([A-Za-z0-9_]+))")
GRAFANA_BUILTINS = {
    "__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms",
    "__dashboard", "__from", "__to", "__org", "__user", "timeFilter", "__name",
}
# Sample values for turning dashboard queries into parseable PromQL.
SAMPLE = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h", "__range_s": "3600",
          "__interval_ms": "60000", "__range_ms": "3600000"}
SEVERITIES = {"critical", "warning", "info"}


class Problems(list):
    def add(self, where: str, what: str) -> None:
        self.append(f"{where}: {what}")


def all_panels(panels: list) -> list:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels") or []))
    return out


def check_dashboard(problems: Problems) -> tuple[list[str], dict]:
    """Returns the dashboard's query expressions and its variables (name -> sample value)."""
    where = os.path.relpath(DASHBOARD, ROOT)
    try:
        with open(DASHBOARD, encoding="utf-8") as f:
            raw = f.read()
        d = json.loads(raw)
    except (OSError, ValueError) as e:
        problems.add(where, f"cannot be read as JSON: {e}")
        return [], {}
    if "${DS_" in raw or "__inputs" in d:
        problems.add(where, "uses ${DS_...} import placeholders or __inputs (breaks provisioning)")
    for key in ("uid", "title"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            problems.add(where, f"missing {key}")
    if isinstance(d.get("uid"), str) and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"]):
        problems.add(where, f"uid {d['uid']!r} is not 1-40 characters of [A-Za-z0-9_-]")
    if d.get("id") is not None:
        problems.add(where, '"id" must be null in a provisioned dashboard')
    if not isinstance(d.get("schemaVersion"), int):
        problems.add(where, "missing schemaVersion")

    variables = {}
    tvars = (d.get("templating") or {}).get("list")
    if not isinstance(tvars, list):
        problems.add(where, "templating.list missing")
        tvars = []
    ds_vars = [v for v in tvars if v.get("type") == "datasource" and v.get("name") == "datasource"]
    if len(ds_vars) != 1 or ds_vars[0].get("query") != "prometheus":
        problems.add(where, 'needs one templating variable {"type": "datasource", "name": '
                            '"datasource", "query": "prometheus"}')
    for v in tvars:
        name = v.get("name")
        if not name:
            problems.add(where, "a templating variable without a name")
            continue
        if name in variables:
            problems.add(where, f"templating variable {name} defined twice")
        if v.get("type") == "query" and v.get("datasource") != DS_REF:
            problems.add(where, f"variable {name}: datasource must be {DS_REF}")
        if v.get("type") == "textbox":
            variables[name] = str(v.get("query") or "x")
        elif v.get("type") == "datasource":
            variables[name] = "prometheus"
        else:
            variables[name] = ".*"

    panels = d.get("panels")
    if not isinstance(panels, list) or not panels:
        problems.add(where, "no panels")
        return [], variables
    exprs = []
    ids = {}
    boxes = []
    for p in all_panels(panels):
        pid = p.get("id")
        title = p.get("title") or "?"
        pw = f"{where}: panel {pid} {title!r}"
        if not isinstance(pid, int):
            problems.add(pw, "missing integer id")
        elif pid in ids:
            problems.add(pw, f"id {pid} already used by panel {ids[pid]!r}")
        else:
            ids[pid] = title
        if not p.get("title"):
            problems.add(pw, "missing title")
        gp = p.get("gridPos")
        if not isinstance(gp, dict) or not all(isinstance(gp.get(k), int) for k in "hwxy"):
            problems.add(pw, "missing gridPos {h, w, x, y}")
        else:
            if gp["x"] < 0 or gp["y"] < 0 or gp["w"] < 1 or gp["h"] < 1 or gp["x"] + gp["w"] > 24:
                problems.add(pw, f"gridPos {gp} outside the 24-column grid")
            for other_title, o in boxes:
                if (gp["x"] < o["x"] + o["w"] and o["x"] < gp["x"] + gp["w"]
                        and gp["y"] < o["y"] + o["h"] and o["y"] < gp["y"] + gp["h"]):
                    problems.add(pw, f"overlaps panel {other_title!r}")
            boxes.append((title, gp))
        if p.get("type") == "row":
            continue
        if p.get("datasource") != DS_REF:
            problems.add(pw, f"datasource must be {DS_REF}, is {p.get('datasource')}")
        targets = p.get("targets")
        if not isinstance(targets, list) or not targets:
            problems.add(pw, "no targets")
            continue
        refs = set()
        for t in targets:
            ref = t.get("refId")
            if not ref or ref in refs:
                problems.add(pw, f"target refId {ref!r} missing or repeated")
            refs.add(ref)
            if "datasource" in t and t["datasource"] != DS_REF:
                problems.add(pw, f"target {ref}: datasource must be {DS_REF}")
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.add(pw, f"target {ref}: empty expr")
                continue
            for m in VAR_RE.finditer(expr):
                name = m.group(1) or m.group(2)
                if name not in variables and name not in GRAFANA_BUILTINS:
                    problems.add(pw, f"target {ref}: unknown variable ${name}")
            exprs.append(expr)
    return exprs, variables


def check_provisioning(problems: Problems) -> None:
    for fname in ("datasources.yaml", "dashboards.yaml"):
        path = os.path.join(PROVISIONING, fname)
        where = os.path.relpath(path, ROOT)
        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            problems.add(where, f"unreadable: {e}")
            continue
        if not isinstance(doc, dict) or doc.get("apiVersion") != 1:
            problems.add(where, "apiVersion must be 1")
            continue
        if fname == "datasources.yaml":
            dss = doc.get("datasources") or []
            proms = [ds for ds in dss if ds.get("type") == "prometheus"]
            if not proms:
                problems.add(where, "no prometheus datasource")
            for ds in proms:
                for key in ("name", "uid", "url"):
                    if not ds.get(key):
                        problems.add(where, f"datasource {ds.get('name')}: missing {key}")
        else:
            provs = doc.get("providers") or []
            if not provs:
                problems.add(where, "no providers")
            for pr in provs:
                if pr.get("type") != "file" or not (pr.get("options") or {}).get("path"):
                    problems.add(where, f"provider {pr.get('name')}: needs type file and options.path")


def anchors_in(path: str) -> set[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return set()
    found = set(re.findall(r'<a\s+(?:id|name)="([^"]+)"', text))
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def check_alerts(problems: Problems) -> list[str]:
    where = os.path.relpath(ALERTS, ROOT)
    try:
        with open(ALERTS, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        problems.add(where, f"unreadable: {e}")
        return []
    groups = (doc or {}).get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list) or not groups:
        problems.add(where, "no groups")
        return []
    anchors = anchors_in(OPERATIONS_DOC)
    if not anchors:
        problems.add(os.path.relpath(OPERATIONS_DOC, ROOT), "missing or without headings")
    exprs = []
    names = set()
    for g in groups:
        for r in g.get("rules") or []:
            if isinstance(r.get("expr"), str):
                exprs.append(r["expr"])
            name = r.get("alert")
            if not name:
                continue
            aw = f"{where}: alert {name}"
            if name in names:
                problems.add(aw, "defined twice")
            names.add(name)
            sev = (r.get("labels") or {}).get("severity")
            if sev not in SEVERITIES:
                problems.add(aw, f"labels.severity must be one of {sorted(SEVERITIES)}, is {sev!r}")
            ann = r.get("annotations") or {}
            for key in ("summary", "description", "runbook"):
                if not isinstance(ann.get(key), str) or not ann[key].strip():
                    problems.add(aw, f"missing annotation {key}")
            want = f"README.md#runbook-{name.lower()}"
            if ann.get("runbook") and ann["runbook"] != want:
                problems.add(aw, f"runbook must be {want!r}, is {ann['runbook']!r}")
            if anchors and f"runbook-{name.lower()}" not in anchors:
                problems.add(aw, f"no anchor runbook-{name.lower()} in README.md")
    if not names:
        problems.add(where, "no alerting rules")
    return exprs


def metric_names(exprs: list[str]) -> list[str]:
    names = set()
    for e in exprs:
        for m in METRIC_RE.finditer(e):
            names.add(re.sub(r"_(bucket|sum|count)$", "", m.group(1)))
    return sorted(names)


def substitute(expr: str, variables: dict) -> str:
    def repl(m):
        name = m.group(1) or m.group(2)
        return SAMPLE.get(name, variables.get(name, "x"))
    return VAR_RE.sub(repl, expr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics-out", help="write the metric names used, one per line")
    ap.add_argument("--promql-out", help="write the dashboard queries as a rules file for promtool")
    args = ap.parse_args()

    problems = Problems()
    dash_exprs, variables = check_dashboard(problems)
    check_provisioning(problems)
    alert_exprs = check_alerts(problems)
    names = metric_names(dash_exprs + alert_exprs)
    if not any(n.startswith("r2f_") for n in names):
        problems.add("dashboards", "no r2f_ metric used at all")

    if args.metrics_out:
        with open(args.metrics_out, "w", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in names))
    if args.promql_out:
        rules = [{"record": f"r2f_dashboard_query_{i}", "expr": substitute(e, variables)}
                 for i, e in enumerate(dash_exprs)]
        with open(args.promql_out, "w", encoding="utf-8") as f:
            yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, f,
                           sort_keys=False, width=1000)

    if problems:
        for p in problems:
            print(f"check_dashboards: {p}", file=sys.stderr)
        print(f"check_dashboards: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_dashboards: ok ({len(dash_exprs)} dashboard queries, {len(alert_exprs)} alert "
          f"rules, {len(names)} metric names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
