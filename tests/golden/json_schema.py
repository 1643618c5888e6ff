"""A validator for the subset of JSON Schema (draft 2020-12) that docs/manifest.schema.json uses, so the tests
can check manifests and indexes against it without a jsonschema dependency. Called by tests/test_golden.py.

A keyword it does not know raises instead of being ignored: if the schema starts using one, this file must
learn it, or the schema would silently check less than it says.
"""
from __future__ import annotations

import re
from typing import Any

ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "$defs"}
TYPES = {
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
    "string": lambda v: type(v) is str,
    "integer": lambda v: type(v) is int,
    "number": lambda v: type(v) in (int, float),
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
}


def validate(value: Any, schema: dict, root: dict | None = None, where: str = "$") -> list[str]:
    """Every way `value` breaks `schema`, as 'path: reason' strings (empty when it conforms).

    Args:
        value: parsed JSON.
        schema: the (sub)schema to check against.
        root: the whole schema document, for "$ref": "#/..." (default: schema itself).
        where: the JSON path of value, for the messages.

    Returns:
        A list of errors; empty if value conforms.
    """
    root = schema if root is None else root
    errors: list[str] = []
    for kw, arg in schema.items():
        if kw in ANNOTATIONS:
            continue
        if kw == "$ref":
            target = root
            for part in arg.removeprefix("#/").split("/"):
                target = target[part]
            errors += validate(value, target, root, where)
        elif kw == "type":
            names = arg if isinstance(arg, list) else [arg]
            if not any(TYPES[n](value) for n in names):
                errors.append(f"{where}: {type(value).__name__} is not {arg}")
        elif kw == "const":
            if not (type(value) is type(arg) and value == arg):
                errors.append(f"{where}: {value!r:.60} is not {arg!r}")
        elif kw == "enum":
            if not any(type(value) is type(a) and value == a for a in arg):
                errors.append(f"{where}: {value!r:.60} is not one of {arg}")
        elif kw == "pattern":
            if type(value) is str and not re.search(arg, value):
                errors.append(f"{where}: {value!r:.60} does not match {arg}")
        elif kw in ("minimum", "maximum", "multipleOf"):
            if type(value) in (int, float):
                bad = (value < arg if kw == "minimum" else value > arg if kw == "maximum" else value % arg != 0)
                if bad:
                    errors.append(f"{where}: {value} breaks {kw} {arg}")
        elif kw in ("minItems", "maxItems"):
            if type(value) is list and (len(value) < arg if kw == "minItems" else len(value) > arg):
                errors.append(f"{where}: {len(value)} items breaks {kw} {arg}")
        elif kw == "required":
            if type(value) is dict:
                errors += [f"{where}: {k!r} is missing" for k in arg if k not in value]
        elif kw == "properties":
            if type(value) is dict:
                for k, sub in arg.items():
                    if k in value:
                        errors += validate(value[k], sub, root, f"{where}.{k}")
        elif kw == "additionalProperties":
            if type(value) is dict:
                for k in value:
                    if k in schema.get("properties", {}):
                        continue
                    if arg is False:
                        errors.append(f"{where}: property {k!r} is not allowed")
                    elif isinstance(arg, dict):
                        errors += validate(value[k], arg, root, f"{where}.{k}")
        elif kw == "prefixItems":
            if type(value) is list:
                for i, (x, sub) in enumerate(zip(value, arg)):
                    errors += validate(x, sub, root, f"{where}[{i}]")
        elif kw == "items":
            if type(value) is list:
                start = len(schema.get("prefixItems", []))
                if arg is False:
                    if len(value) > start:
                        errors.append(f"{where}: more than {start} items")
                else:
                    for i, x in enumerate(value[start:], start):
                        errors += validate(x, arg, root, f"{where}[{i}]")
        elif kw == "oneOf":
            matching = [i for i, sub in enumerate(arg) if not validate(value, sub, root, where)]
            if len(matching) != 1:
                errors.append(f"{where}: matches {len(matching)} of the oneOf alternatives, not exactly one")
        else:
            raise NotImplementedError(f"JSON Schema keyword {kw!r} is not supported by tests/golden/json_schema.py")
    return errors
