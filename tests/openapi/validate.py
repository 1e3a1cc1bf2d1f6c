"""Validates recorded API answers against docs/openapi.json.

Usage: validate.py OPENAPI.json EXCHANGES.json
EXCHANGES is a list of {"method", "path", "status", "content_type", "body"}. Every answer must
match a documented path, method and status, and its JSON body the documented schema.
"""
import json
import sys

import jsonschema

spec_path, exchanges_path = sys.argv[1:3]
spec = json.load(open(spec_path))
exchanges = json.load(open(exchanges_path))


def template_for(path):
    path = path.split("?")[0]
    parts = path.strip("/").split("/")
    best = None
    for template in spec["paths"]:
        tparts = template.strip("/").split("/")
        if len(tparts) != len(parts):
            continue
        if all(t == p or (t.startswith("{") and t.endswith("}")) for t, p in zip(tparts, parts)):
            literal = sum(1 for t in tparts if not t.startswith("{"))
            if best is None or literal > best[0]:
                best = (literal, template)
    return best[1] if best else None


def resolve(node):
    while "$ref" in node:
        target = spec
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


failures = []
for exchange in exchanges:
    where = f'{exchange["method"]} {exchange["path"]} -> {exchange["status"]}'
    template = template_for(exchange["path"])
    if template is None:
        failures.append(f"{where}: path not documented")
        continue
    operation = spec["paths"][template].get(exchange["method"].lower())
    if operation is None:
        failures.append(f"{where}: method not documented for {template}")
        continue
    response = operation["responses"].get(str(exchange["status"]))
    if response is None:
        failures.append(f"{where}: status not documented for {template}")
        continue
    content = resolve(response).get("content", {})
    media = exchange["content_type"].split(";")[0].strip()
    if media not in content:
        failures.append(f"{where}: content type {media} not documented")
        continue
    if media != "application/json":
        continue
    schema = dict(content[media]["schema"])
    schema["components"] = spec["components"]
    try:
        jsonschema.validate(exchange["body"], schema, cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as error:
        failures.append(f"{where}: {error.message} at {list(error.absolute_path)}")

if failures:
    print("\n".join(failures))
    sys.exit(1)
print(f"{len(exchanges)} answers match docs/openapi.json")
