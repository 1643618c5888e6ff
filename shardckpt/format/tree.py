"""Flattening a state_dict into fqn -> leaf, and the JSON encoding of non-tensor values (a closed set of
types: no pickle, no eval). Objects with state_dict()/load_state_dict() (torch.distributed.checkpoint's
Stateful protocol) are expanded on save and given their state back on load."""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from shardckpt.errors import UnsupportedValueError
from shardckpt.format.records import DTYPE_NAMES, DTYPES


def is_stateful(obj) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)) \
        and not isinstance(obj, torch.Tensor)


@dataclass
class Leaf:
    """One leaf of a state: `container[slot]` holds `value` (a tensor or a plain value)."""
    fqn: str
    container: Any
    slot: Any
    value: Any


@dataclass
class Flat:
    tree: dict
    leaves: dict[str, Leaf] = field(default_factory=dict)
    statefuls: list[tuple[Any, dict]] = field(default_factory=list)  # (object, its expanded state_dict)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: l.value for k, l in self.leaves.items() if isinstance(l.value, torch.Tensor)}

    @property
    def values(self) -> dict[str, Any]:
        return {k: l.value for k, l in self.leaves.items() if not isinstance(l.value, torch.Tensor)}


def _join(prefix: str, k) -> str:
    return f"{prefix}.{k}" if prefix else str(k)


def flatten(state) -> Flat:
    """Walk a (nested) state: dicts with str/int keys, lists, tuples, tensors, Stateful objects and plain
    values. Stateful objects are replaced by their state_dict() (recorded, so load can hand it back)."""
    flat = Flat(tree={})

    def walk(obj, prefix: str, container, slot, depth: int):
        if depth > 64:
            raise UnsupportedValueError("state is nested more than 64 levels deep", key=prefix)
        if is_stateful(obj):
            sd = obj.state_dict()
            flat.statefuls.append((obj, sd))
            return walk(sd, prefix, None, None, depth + 1)
        if isinstance(obj, torch.Tensor):
            _add_leaf(flat, Leaf(prefix, container, slot, obj))
            return {"t": "tensor", "key": prefix}
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                if type(k) not in (str, int):
                    raise UnsupportedValueError(f"dict key {k!r} is neither str nor int", key=prefix)
                items.append([k, walk(v, _join(prefix, k), obj, k, depth + 1)])
            return {"t": "dict", "items": items}
        if isinstance(obj, list):
            return {"t": "list", "items": [walk(v, _join(prefix, i), obj, i, depth + 1) for i, v in enumerate(obj)]}
        if isinstance(obj, tuple) and not _is_plain_value(obj):
            return {"t": "tuple", "items": [walk(v, _join(prefix, i), None, None, depth + 1)
                                           for i, v in enumerate(obj)]}
        encode_value(obj, prefix)  # raises early for unsupported types
        _add_leaf(flat, Leaf(prefix, container, slot, obj))
        return {"t": "value", "key": prefix}

    flat.tree = walk(state, "", None, None, 0)
    return flat


def _is_plain_value(obj) -> bool:
    """A tuple made only of plain values is saved as one value (e.g. Adam's betas)."""
    return all(not isinstance(x, (torch.Tensor, dict, list)) and not is_stateful(x) and
               (not isinstance(x, tuple) or _is_plain_value(x)) for x in obj)


def _add_leaf(flat: Flat, leaf: Leaf) -> None:
    if leaf.fqn in flat.leaves:
        raise UnsupportedValueError("two leaves flatten to the same key (e.g. dict keys 1 and '1')", key=leaf.fqn)
    flat.leaves[leaf.fqn] = leaf


def encode_value(v, key: str = "", depth: int = 0) -> dict:
    """A plain value as typed JSON. Floats are stored as hex strings so they round-trip exactly (nan, inf)."""
    if depth > 64:
        raise UnsupportedValueError("value nested too deeply", key=key)
    if v is None:
        return {"t": "none"}
    if isinstance(v, bool):
        return {"t": "bool", "v": v}
    if isinstance(v, int):
        return {"t": "int", "v": int(v)}
    if isinstance(v, float):
        return {"t": "float", "v": float(v).hex()}
    if isinstance(v, str):
        return {"t": "str", "v": v}
    if isinstance(v, (bytes, bytearray)):
        return {"t": "bytes", "v": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, torch.dtype):
        if v not in DTYPE_NAMES:
            raise UnsupportedValueError(f"dtype {v} cannot be saved", key=key)
        return {"t": "dtype", "v": DTYPE_NAMES[v]}
    if isinstance(v, (list, tuple)):
        return {"t": "tuple" if isinstance(v, tuple) else "list",
                "v": [encode_value(x, key, depth + 1) for x in v]}
    if isinstance(v, dict):
        items = []
        for k, x in v.items():
            if type(k) not in (str, int):
                raise UnsupportedValueError(f"dict key {k!r} is neither str nor int", key=key)
            items.append([k, encode_value(x, key, depth + 1)])
        return {"t": "dict", "v": items}
    try:
        import numpy as np
        if isinstance(v, np.generic):
            return encode_value(v.item(), key, depth)
    except ImportError:
        pass
    raise UnsupportedValueError(
        f"values of type {type(v).__name__} are not saved (shardckpt stores tensors and JSON-like values, "
        f"never pickle); convert it to a tensor, str or dict first", key=key)


def decode_value(v: dict):
    """Inverse of encode_value, on a value already validated by format.parse_manifest."""
    t = v["t"]
    if t == "none":
        return None
    if t in ("bool", "int", "str"):
        return v["v"]
    if t == "float":
        return float.fromhex(v["v"])
    if t == "bytes":
        return base64.b64decode(v["v"])
    if t == "dtype":
        return DTYPES[v["v"]]
    if t == "list":
        return [decode_value(x) for x in v["v"]]
    if t == "tuple":
        return tuple(decode_value(x) for x in v["v"])
    if t == "dict":
        return {k: decode_value(x) for k, x in v["v"]}
    raise ValueError(t)


def rebuild(tree: dict, leaf: Callable[[str, str], Any], keep: Callable[[str], bool] = lambda k: True):
    """Rebuild a nested state from a saved tree; `leaf(kind, key)` gives each leaf's object. Leaves whose
    key `keep` rejects are left out (with containers that end up empty)."""
    t = tree["t"]
    if t in ("tensor", "value"):
        return leaf(t, tree["key"]) if keep(tree["key"]) else SKIP
    if t == "dict":
        out = {}
        for k, node in tree["items"]:
            v = rebuild(node, leaf, keep)
            if v is not SKIP:
                out[k] = v
        return out if out or not tree["items"] else SKIP
    items = [rebuild(n, leaf, keep) for n in tree["items"]]
    items = [x for x in items if x is not SKIP]
    if not items and tree["items"]:
        return SKIP
    return tuple(items) if t == "tuple" else items


SKIP = object()
