#!/usr/bin/env python3
"""Render a Kustomize directory (the subset deploy/k8s uses) without the kustomize binary.

    python3 scripts/render_kustomize.py deploy/k8s/overlays/production > rendered.yaml

Supported kustomization fields: resources (files and directories), namespace, labels (pairs,
includeSelectors false: metadata.labels only), images (name -> newName/newTag/digest),
configMapGenerator (files, literals, options.labels, behavior create/merge/replace, the content
hash suffix computed the way kustomize does, and the renaming of references to it in pod
templates) and patches given by path (strategic-merge for core kinds, merge-by-key on the lists
Kubernetes marks so; JSON merge patch for custom resources). Anything else is refused, so that the
output never silently differs from `kubectl kustomize`. scripts/check_ops.sh compares the two
when kubectl is installed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys

import yaml

SUPPORTED = {
    "apiVersion", "kind", "resources", "namespace", "labels", "images", "configMapGenerator",
    "patches",
}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "ClusterTriggerAuthentication",
    "RuntimeClass", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
}
# Strategic-merge list keys (patchMergeKey in the Kubernetes API) for the lists we patch.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "imagePullSecrets": "name", "volumeMounts": "mountPath",
    "ports": "containerPort", "volumeDevices": "devicePath", "topologySpreadConstraints": None,
}
CORE_GROUPS = ("v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2",
               "networking.k8s.io/v1", "rbac.authorization.k8s.io/v1", "scheduling.k8s.io/v1")


class RenderError(Exception):
    pass


def load_yaml_docs(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomize_hash(cm: dict) -> str:
    """kustomize api/hasher: sha256 of the JSON of {kind, name, data[, binaryData]} (keys sorted,
    Go's HTML escaping), first 10 hex digits with 0 1 3 a e replaced by g h k m t."""
    # kustomize 5 hashes the generated object before it has a name: "name" is always "".
    m = {"kind": cm["kind"], "name": "", "data": cm.get("data") or {}}
    if cm.get("binaryData"):
        m["binaryData"] = cm["binaryData"]
    encoded = json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for a, b in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                 ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        encoded = encoded.replace(a, b)
    hexsum = hashlib.sha256(encoded.encode("utf-8")).hexdigest()
    table = {"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}
    return "".join(table.get(c, c) for c in hexsum[:10])


def smp_merge(base, patch, strategic: bool, field: str | None = None):
    """Strategic merge patch (strategic=True) or JSON merge patch (RFC 7386)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        if patch.get("$patch") == "replace":
            out = {k: v for k, v in patch.items() if k != "$patch"}
            return out
        out = dict(base)
        for k, v in patch.items():
            if k.startswith("$"):
                raise RenderError(f"unsupported patch directive {k}")
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = smp_merge(out[k], v, strategic, k)
            else:
                out[k] = strip_nulls(v)
        return out
    if isinstance(patch, list) and isinstance(base, list) and strategic:
        key = MERGE_KEYS.get(field or "")
        if key and all(isinstance(i, dict) and key in i for i in base + patch):
            # kustomize (kyaml) keeps the patch's items first, in patch order, then the rest.
            originals = {i[key]: i for i in base}
            patched_keys = [p[key] for p in patch]
            out = [smp_merge(originals[p[key]], p, strategic) if p[key] in originals
                   else strip_nulls(p) for p in patch]
            out += [i for i in base if i[key] not in patched_keys]
            return out
    return strip_nulls(patch)


def strip_nulls(v):
    if isinstance(v, dict):
        return {k: strip_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [strip_nulls(x) for x in v]
    return v


def ident(obj: dict) -> tuple:
    return (obj.get("apiVersion"), obj.get("kind"), obj.get("metadata", {}).get("name"))


def pod_spec(obj: dict) -> dict | None:
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return (spec.get("template") or {}).get("spec")
    if kind == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if kind == "Pod":
        return spec
    return None


def rename_configmap_refs(objs: list[dict], old: str, new: str) -> None:
    for obj in objs:
        ps = pod_spec(obj)
        if not ps:
            continue
        for vol in ps.get("volumes") or []:
            if (vol.get("configMap") or {}).get("name") == old:
                vol["configMap"]["name"] = new
            for src in (vol.get("projected") or {}).get("sources") or []:
                if (src.get("configMap") or {}).get("name") == old:
                    src["configMap"]["name"] = new
        for c in (ps.get("containers") or []) + (ps.get("initContainers") or []):
            for e in c.get("envFrom") or []:
                if (e.get("configMapRef") or {}).get("name") == old:
                    e["configMapRef"]["name"] = new
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref and ref.get("name") == old:
                    ref["name"] = new


def set_image(objs: list[dict], images: list[dict]) -> None:
    for obj in objs:
        ps = pod_spec(obj)
        if not ps:
            continue
        for c in (ps.get("containers") or []) + (ps.get("initContainers") or []):
            img = c.get("image", "")
            name, tag = img, None
            if "@" in img:
                name = img.split("@", 1)[0]
            elif ":" in img.rsplit("/", 1)[-1]:
                name, tag = img.rsplit(":", 1)
            for rule in images:
                if rule["name"] != name:
                    continue
                new_name = rule.get("newName", name)
                if "digest" in rule:
                    c["image"] = f"{new_name}@{rule['digest']}"
                elif "newTag" in rule:
                    c["image"] = f"{new_name}:{rule['newTag']}"
                else:
                    c["image"] = f"{new_name}:{tag}" if tag else new_name


def render(directory: str) -> list[dict]:
    """The objects `kustomize build DIRECTORY` would output (order aside)."""
    objs, _ = _render(directory)
    return objs


def _render(directory: str) -> tuple[list[dict], dict]:
    kpath = None
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if os.path.isfile(os.path.join(directory, name)):
            kpath = os.path.join(directory, name)
    if kpath is None:
        raise RenderError(f"{directory}: no kustomization.yaml")
    k = load_yaml_docs(kpath)[0]
    unknown = set(k) - SUPPORTED
    if unknown:
        raise RenderError(f"{kpath}: unsupported fields {sorted(unknown)}")

    objs: list[dict] = []
    generated: dict[str, dict] = {}  # base name -> generated ConfigMap (unhashed name kept here)
    for res in k.get("resources") or []:
        p = os.path.normpath(os.path.join(directory, res))
        if os.path.isdir(p):
            sub, sub_gen = _render(p)
            objs += sub
            generated.update(sub_gen)
        elif os.path.isfile(p):
            for d in load_yaml_docs(p):
                if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
                    raise RenderError(f"{p}: a document without apiVersion/kind")
                objs.append(d)
        else:
            raise RenderError(f"{kpath}: resource {res} not found")

    # Undo the hash suffix of generated ConfigMaps from below; re-hashed at the end of this level.
    for base_name, cm in generated.items():
        hashed = cm["metadata"]["name"]
        cm["metadata"]["name"] = base_name
        rename_configmap_refs(objs, hashed, base_name)

    for gen in k.get("configMapGenerator") or []:
        name = gen["name"]
        behavior = gen.get("behavior", "create")
        data: dict[str, str] = {}
        for f in gen.get("files") or []:
            key, _, fp = f.partition("=") if "=" in f else (os.path.basename(f), "", f)
            with open(os.path.join(directory, fp), encoding="utf-8") as fh:
                data[key] = fh.read()
        for lit in gen.get("literals") or []:
            key, _, val = lit.partition("=")
            data[key] = val
        labels = (gen.get("options") or {}).get("labels") or {}
        if behavior == "create":
            if name in generated:
                raise RenderError(f"{kpath}: ConfigMap {name} generated twice")
            cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
            if labels:
                cm["metadata"]["labels"] = dict(labels)
            generated[name] = cm
            objs.append(cm)
        elif behavior in ("merge", "replace"):
            if name not in generated:
                raise RenderError(f"{kpath}: ConfigMap {name} to {behavior} does not exist")
            cm = generated[name]
            cm["data"] = {**cm.get("data", {}), **data} if behavior == "merge" else data
            if labels:
                cm["metadata"].setdefault("labels", {}).update(labels)
        else:
            raise RenderError(f"{kpath}: unknown behavior {behavior}")

    for patch in k.get("patches") or []:
        if set(patch) != {"path"}:
            raise RenderError(f"{kpath}: only `patches: - path: FILE` is supported")
        for pd in load_yaml_docs(os.path.join(directory, patch["path"])):
            target = [o for o in objs if ident(o) == ident(pd)]
            if len(target) != 1:
                raise RenderError(f"{kpath}: patch {patch['path']} matches {len(target)} objects")
            strategic = pd["apiVersion"] in CORE_GROUPS
            merged = smp_merge(target[0], pd, strategic)
            target[0].clear()
            target[0].update(merged)

    if k.get("images"):
        set_image(objs, k["images"])

    for lab in k.get("labels") or []:
        if lab.get("includeSelectors") or lab.get("includeTemplates"):
            raise RenderError(f"{kpath}: labels with includeSelectors/includeTemplates unsupported")
        for o in objs:
            o.setdefault("metadata", {}).setdefault("labels", {}).update(lab["pairs"])

    if "namespace" in k:
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o.setdefault("metadata", {})["namespace"] = k["namespace"]

    for base_name, cm in generated.items():
        hashed = f"{base_name}-{kustomize_hash(cm)}"
        cm["metadata"]["name"] = hashed
        rename_configmap_refs(objs, base_name, hashed)
    return objs, generated


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        objs = render(argv[1])
    except (RenderError, OSError, yaml.YAMLError, KeyError) as e:
        print(f"render_kustomize: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objs, sys.stdout, sort_keys=True, default_flow_style=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
