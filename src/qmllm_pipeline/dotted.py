"""Dotted paths into nested dicts (`"evaluate.jailbreak.steps"`): the one getter the metrics, the seed tables
and the parameter overrides share."""

from __future__ import annotations

import copy


def lookup(tree, dotted: str):
    """`tree[a][b]...` for the path `a.b...`; a key that itself holds dots (the interval keys, `dsr.single`)
    matches as a whole. None where the path leads nowhere."""
    if not dotted:
        return tree
    if not isinstance(tree, dict):
        return None
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):   # the longest key present first
        key = ".".join(parts[:cut])
        if key in tree:
            found = lookup(tree[key], ".".join(parts[cut:]))
            if found is not None:
                return found
    return None


def with_overrides(tree: dict, **overrides) -> dict:
    """A deep copy of `tree` with dotted keys set (`with_overrides(params, **{"pretrain.model.cls_codes": 64})`);
    every key but the last must lead to a dict that exists."""
    changed = copy.deepcopy(tree)
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        parent = changed
        for key in path:
            if not isinstance(parent.get(key), dict):
                raise KeyError(f"{dotted}: no {'.'.join(path)} to set {last} in")
            parent = parent[key]
        parent[last] = value
    return changed
