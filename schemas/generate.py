"""Write the JSON Schema and AsyncAPI files from the msgspec types.

    python -m schemas.generate          # rewrite schemas/json/ and schemas/asyncapi.yaml
    python -m schemas.generate --check  # exit 1 when a file is stale

Other languages use the fabric from these files alone, so they are generated,
never edited by hand, and a test fails when they fall behind the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from schemas.contract import CHANNELS, MESSAGES, Channel

__all__ = ["asyncapi_document", "json_schema_files", "main"]

SCHEMA_DIR = Path(__file__).parent
JSON_DIR = SCHEMA_DIR / "json"
ASYNCAPI_FILE = SCHEMA_DIR / "asyncapi.yaml"
CONTRACT_VERSION = "0.1.0"

_PARAM_DOC = {
    "agent_id": "Agent id: [a-z0-9][a-z0-9_-]{0,62}",
    "node_id": "Node id: [a-z0-9][a-z0-9_-]{0,62}",
    "task_type": "Task type: [a-z0-9][a-z0-9_-]{0,62}",
    "kind": "Event kind: two or three id-shaped tokens joined by '.', e.g. agent.exited",
    "method": "API method: create, update, scale, delete, get, list, drain, cordon or uncordon",
}


def _camel(text: str) -> str:
    head, *rest = text.split("_")
    return head + "".join(part.title() for part in rest)


def json_schema_files() -> dict[str, str]:
    """File name -> content for every message type."""
    files = {}
    for name, type_ in MESSAGES.items():
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": name}
        schema.update(msgspec.json.schema(type_))
        files[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=False) + "\n"
    return files


def _params(address: str) -> dict[str, Any]:
    names = [part[1:-1] for part in address.split(".") if part.startswith("{")]
    return {n: {"description": _PARAM_DOC[n]} for n in names}


def _message_refs(names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return {n: {"$ref": f"#/components/messages/{n}"} for n in names}


def asyncapi_document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        list(MESSAGES.values()), ref_template="#/components/schemas/{name}"
    )
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for channel in CHANNELS:
        key = _camel(channel.family.value)
        channels[key] = {
            "address": channel.address,
            "description": channel.description,
            "messages": _message_refs([channel.message, *channel.variants]),
        }
        params = _params(channel.address)
        if params:
            channels[key]["parameters"] = params
        operations[f"send{key[0].upper()}{key[1:]}"] = _operation(channel, key, "send")
        if channel.reply:
            channels[key + "Reply"] = {
                "address": None,
                "description": f"Reply to {channel.address} (the request's reply inbox).",
                "messages": _message_refs(channel.reply),
            }
    schemas = dict(components)
    messages = {
        name: {
            "name": name,
            "contentType": "application/json",
            "payload": _payload_ref(name, type_, schemas),
        }
        for name, type_ in MESSAGES.items()
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "agent-fabric",
            "version": CONTRACT_VERSION,
            "description": (
                "Subjects and messages of agent-fabric. Every connection is NATS over mutual "
                "TLS; commands carry a signed token. Times are RFC 3339 with a UTC offset."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "embedded": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "The embedded nats-server started by `fabric up` (TLS only).",
                "security": [{"$ref": "#/components/securitySchemes/mtls"}],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "securitySchemes": {
                "mtls": {
                    "type": "X509",
                    "description": (
                        "A client certificate from the fabric's CA; its role sets permissions."
                    ),
                }
            },
        },
    }


def _payload_ref(name: str, type_: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    # Unions have no component of their own; give them one under the message name.
    if name not in schemas:
        schemas[name] = msgspec.json.schema_components(
            [type_], ref_template="#/components/schemas/{name}"
        )[0][0]
    return {"$ref": f"#/components/schemas/{name}"}


def _operation(channel: Channel, key: str, action: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{key}"},
        "summary": channel.description,
        "x-publishers": list(channel.publishers),
    }
    if channel.reply:
        operation["reply"] = {
            "channel": {"$ref": f"#/channels/{key}Reply"},
            "messages": [{"$ref": f"#/channels/{key}Reply/messages/{n}"} for n in channel.reply],
        }
    return operation


def render_asyncapi() -> str:
    import yaml  # dev-time only: the `test` extra installs PyYAML

    header = "# Generated by `python -m schemas.generate`; do not edit.\n"
    return header + yaml.safe_dump(asyncapi_document(), sort_keys=False, width=100)


def expected_files() -> dict[Path, str]:
    files = {JSON_DIR / name: text for name, text in json_schema_files().items()}
    files[ASYNCAPI_FILE] = render_asyncapi()
    return files


def stale_files() -> list[Path]:
    expected = expected_files()
    stale = [p for p, text in expected.items() if not p.exists() or p.read_text() != text]
    extra = [p for p in JSON_DIR.glob("*.schema.json") if p not in expected]
    return stale + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        return 1 if stale else 0
    JSON_DIR.mkdir(exist_ok=True)
    for path in JSON_DIR.glob("*.schema.json"):
        path.unlink()
    for path, text in expected_files().items():
        path.write_text(text)
    print(f"wrote {len(MESSAGES)} JSON Schema files and {ASYNCAPI_FILE.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
