"""A small offline kustomize: enough of it to render deploy/k8s without kubectl.

It reads a kustomization's `resources` (YAML files, or directories holding a
kustomization.yaml, recursively) and applies its `patches` of the strategic-merge kind
(`- path: FILE`, the target named by the patch's own kind and name). Strategic merge here is
what the Kubernetes types declare for the fields deploy/k8s patches: lists of containers,
volumes and env entries merge by `name`, volume mounts by `mountPath`, container ports by
`containerPort`; other lists are replaced; a `null` removes a field. Any other kustomization
field is refused, so a manifest that starts using one fails here loudly instead of rendering
differently from `kubectl kustomize` (tests/test_k8s_manifests.py compares the two where
kubectl is installed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]

KUSTOMIZATION = "kustomization.yaml"
_KNOWN_FIELDS = {"apiVersion", "kind", "resources", "patches"}
#: Merge key of each list field that strategic merge merges item by item.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
}


class KustomizeError(ValueError):
    """A kustomization this renderer cannot (or will not) render."""


def render(directory: Path) -> list[Object]:
    """The objects `kubectl kustomize DIRECTORY` would print, in resource order."""
    kustomization = _load_kustomization(directory)
    objects: list[Object] = []
    for entry in kustomization.get("resources", []):
        objects.extend(_resource(directory / entry))
    _check_unique(objects, directory)
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise KustomizeError(f"{directory}: only `patches: - path: FILE` is supported")
        for patch in _documents(directory / patch_entry["path"]):
            target = _find(objects, patch, directory)
            objects[objects.index(target)] = merge(target, patch)
    return objects


def merge(base: Object, patch: Object) -> Object:
    """`patch` applied to `base` by strategic merge (a new object; neither is changed)."""
    merged = dict(base)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        elif isinstance(value, list) and key in _MERGE_KEYS and isinstance(merged.get(key), list):
            merged[key] = _merge_list(merged[key], value, _MERGE_KEYS[key])
        elif (
            key == "ports"
            and isinstance(merged.get(key), list)
            and _all_have(value, "containerPort")
        ):
            merged[key] = _merge_list(merged[key], value, "containerPort")
        else:
            merged[key] = value
    return merged


def identity(obj: Object) -> tuple[str, str, str]:
    metadata = obj.get("metadata") or {}
    return (str(obj.get("kind")), str(metadata.get("namespace", "")), str(metadata.get("name")))


def _merge_list(base: list[Any], patch: list[Any], key: str) -> list[Any]:
    if not (_all_have(base, key) and _all_have(patch, key)):
        raise KustomizeError(f"cannot merge lists by {key!r}: an item has no {key!r}")
    # kustomize's order: the patch's items (merged into their namesakes) first, then the
    # rest of the base's.
    by_key = {item[key]: item for item in base}
    merged = [merge(by_key[item[key]], item) if item[key] in by_key else item for item in patch]
    patched = {item[key] for item in patch}
    return merged + [item for item in base if item[key] not in patched]


def _all_have(items: list[Any], key: str) -> bool:
    return all(isinstance(item, dict) and key in item for item in items)


def _load_kustomization(directory: Path) -> Object:
    path = directory / KUSTOMIZATION
    if not path.is_file():
        raise KustomizeError(f"{directory}: no {KUSTOMIZATION}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise KustomizeError(f"{path}: not a mapping")
    unknown = set(data) - _KNOWN_FIELDS
    if unknown:
        raise KustomizeError(f"{path}: fields this renderer does not support: {sorted(unknown)}")
    return data


def _resource(path: Path) -> list[Object]:
    if path.is_dir():
        return render(path)
    return list(_documents(path))


def _documents(path: Path) -> Iterator[Object]:
    with path.open(encoding="utf-8") as handle:
        for document in yaml.safe_load_all(handle):
            if document is None:
                continue
            if not isinstance(document, dict) or "kind" not in document:
                raise KustomizeError(f"{path}: a document is not a Kubernetes object")
            yield document


def _find(objects: list[Object], patch: Object, directory: Path) -> Object:
    matches = [obj for obj in objects if identity(obj) == identity(patch)]
    if len(matches) != 1:
        raise KustomizeError(f"{directory}: patch target {identity(patch)} not found")
    return matches[0]


def _check_unique(objects: list[Object], directory: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = identity(obj)
        if key in seen:
            raise KustomizeError(f"{directory}: {key} is defined twice")
        seen.add(key)
