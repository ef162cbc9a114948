"""A stateful test double of the Azure CLI, for running the azd hooks without Azure.

Each call is appended to ``$FAKE_AZ_LOG`` (one JSON array of arguments per line). The Azure
state (storage accounts, Event Grid system topics and their subscriptions, role assignments,
function keys) is a JSON file, ``$FAKE_AZ_STATE``, which the commands read and change as Azure
would, so that one environment's postdeploy is seen by another's predown. ``--query`` is evaluated
with a small JMESPath subset (the expressions the hooks use); an expression or command outside
it exits 2, so a hook drifting from what the double understands fails its tests.
``--output tsv`` prints like the real CLI: one row per item, tab-separated, null as ``None``.
An argument ``@path`` is replaced by the file's content, as azure-cli does for every argument
(``_expand_file_prefixed_files``); the log keeps the arguments as they were passed.

State keys: ``accounts`` (id, name, kind, dnsEndpointType, primaryEndpoints), ``topics`` (name,
resourceGroup, source, tags, identity, subscriptions), ``roles`` (id, scope, principalId,
roleDefinitionId), ``resources`` (ids of the containers and queues deployments created),
``keys`` (app name -> list of blobs_extension answers, the last one repeats),
``hidden_role_lists`` (how many ``role assignment list`` calls still answer nothing, as while
assignments propagate), ``deployments`` (names, for the record).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

SUBSCRIPTION = "/subscriptions/00000000-0000-0000-0000-000000000001"
ROLE_DEFINITIONS = SUBSCRIPTION + "/providers/Microsoft.Authorization/roleDefinitions/"
BLOB_DATA_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"
QUEUE_DATA_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
BLOB_DATA_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
NAME_RULES = {
    # ARM: deployment names at most 64 characters; event subscriptions 3-64 letters, digits, '-'.
    "deployment": re.compile(r"[\w.()-]{1,64}"),
    "event subscription": re.compile(r"[A-Za-z0-9-]{3,64}"),
}


class AzError(Exception):
    """What the real CLI reports on stderr with a non-zero exit."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --- a JMESPath subset ------------------------------------------------------------------------


def _split_top(text: str, separator: str) -> list[str]:
    """Split on a separator outside brackets, parentheses and quotes."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        char = text[i]
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif depth == 0 and text.startswith(separator, i):
            parts.append(text[start:i])
            start = i + len(separator)
            i = start
            continue
        i += 1
    parts.append(text[start:])
    return [part.strip() for part in parts]


def _path(expression: str, value: Any) -> Any:
    """A dotted field path (fields may be quoted), with ``a || 'literal'``."""
    alternatives = _split_top(expression, "||")
    if len(alternatives) > 1:
        for alternative in alternatives:
            result = (
                _literal(alternative) if alternative.startswith("'") else _path(alternative, value)
            )
            if result:
                return result
        return result
    for field in _split_top(expression, "."):
        if not isinstance(value, dict):
            return None
        value = value.get(field.strip('"'))
    return value


def _literal(text: str) -> str:
    if not (text.startswith("'") and text.endswith("'")):
        raise AzError(f"fake az: unsupported literal {text!r}", 2)
    return text[1:-1]


def _condition(expression: str, item: Any) -> bool:
    for clause in _split_top(expression, "&&"):
        contains = re.fullmatch(r"contains\((.*)\)", clause)
        if contains:
            haystack, needle = _split_top(contains.group(1), ",")
            if _literal(needle) not in str(_path(haystack, item) or ""):
                return False
        elif "==" in clause:
            left, right = _split_top(clause, "==")
            if _path(left, item) != _literal(right):
                return False
        else:
            raise AzError(f"fake az: unsupported condition {clause!r}", 2)
    return True


def _tokens(segment: str) -> list[str]:
    tokens, i = [], 0
    while i < len(segment):
        if segment[i] == ".":
            i += 1
        elif segment[i] == "[":
            depth, j = 0, i
            while True:
                depth += {"[": 1, "]": -1}.get(segment[j], 0)
                if depth == 0:
                    break
                j += 1
            tokens.append(segment[i : j + 1])
            i = j + 1
        else:
            match = re.match(r'"[^"]*"|[A-Za-z_][\w-]*', segment[i:])
            if not match:
                raise AzError(f"fake az: unsupported query {segment!r}", 2)
            tokens.append(match.group(0))
            i += len(match.group(0))
    return tokens


def _apply(tokens: list[str], value: Any) -> Any:
    if not tokens or value is None:
        return value
    step, rest = tokens[0], tokens[1:]
    if step == "[]" or step.startswith("[?"):
        if not isinstance(value, list):
            return None
        kept = [item for item in value if step == "[]" or _condition(step[2:-1], item)]
        return [result for item in kept if (result := _apply(rest, item)) is not None]
    if re.fullmatch(r"\[-?\d+\]", step):
        index = int(step[1:-1])
        if not isinstance(value, list) or not -len(value) <= index < len(value):
            return None
        return _apply(rest, value[index])
    if step.startswith("["):
        return _apply(rest, [_path(path, value) for path in _split_top(step[1:-1], ",")])
    return _apply(rest, value.get(step.strip('"')) if isinstance(value, dict) else None)


def query(expression: str, value: Any) -> Any:
    for segment in _split_top(expression, "|"):
        value = _apply(_tokens(segment), value)
    return value


# --- output -----------------------------------------------------------------------------------


def _tsv_cell(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return ""
    return str(value)


def render(result: Any, output: str) -> str:
    if output == "none" or result is None:
        return ""
    if output == "tsv":
        rows = result if isinstance(result, list) else [result]
        return "".join(
            "\t".join(_tsv_cell(cell) for cell in row) + "\n"
            if isinstance(row, list)
            else _tsv_cell(row) + "\n"
            for row in rows
        )
    return json.dumps(result, indent=2) + "\n"


# --- commands ---------------------------------------------------------------------------------


def _options(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Positional words and every option's values (``--ids a b`` keeps both)."""
    words: list[str] = []
    options: dict[str, list[str]] = {}
    current = ""
    for arg in args:
        if arg.startswith("--"):
            current = arg
            options.setdefault(current, [])
        elif current:
            options[current].append(arg)
        else:
            words.append(arg)
    return words, options


def _one(options: dict[str, list[str]], flag: str) -> str:
    values = options.get(flag)
    if not values:
        raise AzError(f"the following arguments are required: {flag}", 2)
    return values[0]


def _check_name(kind: str, name: str) -> None:
    if not NAME_RULES[kind].fullmatch(name):
        raise AzError(f"Invalid {kind} name '{name}' ({len(name)} characters)")


def _topic(state: dict[str, Any], group: str, name: str) -> dict[str, Any]:
    for topic in state["topics"]:
        if topic["name"] == name and topic["resourceGroup"].lower() == group.lower():
            return topic
    raise AzError(f"(ResourceNotFound) system topic {group}/{name} not found")


def _account(state: dict[str, Any], name: str) -> dict[str, Any]:
    for account in state["accounts"]:
        if account["name"] == name:
            return account
    raise AzError(f"(ResourceNotFound) storage account {name} not found")


def _grant(state: dict[str, Any], scope: str, principal: str, role: str) -> None:
    assignment = {
        "id": f"{scope}/providers/Microsoft.Authorization/roleAssignments/{len(state['roles'])}",
        "scope": scope,
        "principalId": principal,
        "roleDefinitionId": ROLE_DEFINITIONS + role,
    }
    if not any(
        (r["scope"], r["principalId"], r["roleDefinitionId"])
        == (scope, principal, assignment["roleDefinitionId"])
        for r in state["roles"]
    ):
        state["roles"].append(assignment)


def _deploy(state: dict[str, Any], options: dict[str, list[str]]) -> Any:
    name = _one(options, "--name")
    _check_name("deployment", name)
    group = _one(options, "--resource-group")
    template = Path(_one(options, "--template-file"))
    if not template.is_file():
        raise AzError(f"template file {template} not found")
    parameters = dict(value.split("=", 1) for value in options.get("--parameters", []))
    state["deployments"].append({"name": name, "group": group, "template": template.name})
    outputs: dict[str, Any] = {}
    if template.name == "captures.bicep":
        account = _account(state, parameters["storageAccountName"])
        container = f"{account['id']}/blobServices/default/containers/{parameters['containerName']}"
        queue = f"{account['id']}/queueServices/default/queues/webjobs-blobtrigger-poison"
        resources = state.setdefault("resources", [])
        resources += [r for r in (container, queue) if r not in resources]
        principals = [parameters["principalId"], parameters.get("operatorPrincipalId", "")]
        for principal in filter(None, principals):
            _grant(state, container, principal, BLOB_DATA_READER)
            _grant(state, queue, principal, QUEUE_DATA_CONTRIBUTOR)
        principal = ""
        if parameters["createSystemTopic"] == "true":
            principal = f"principal-of-{parameters['systemTopicName']}"
            state["topics"].append(
                {
                    "name": parameters["systemTopicName"],
                    "resourceGroup": group,
                    "source": account["id"],
                    "tags": json.loads(parameters.get("tags", "{}")),
                    "identity": {"type": "SystemAssigned", "principalId": principal},
                    "subscriptions": [],
                }
            )
        outputs["systemTopicPrincipalId"] = {"value": principal}
    elif template.name == "deadletter-access.bicep":
        account = (
            f"{SUBSCRIPTION}/resourceGroups/{group}/providers/Microsoft.Storage/storageAccounts/"
        )
        scope = (
            f"{account}{parameters['resultsAccountName']}/blobServices/default/containers/"
            f"{parameters['containerName']}"
        )
        _grant(state, scope, parameters["principalId"], BLOB_DATA_CONTRIBUTOR)
    else:
        raise AzError(f"fake az: unknown template {template.name}", 2)
    return {"name": name, "properties": {"outputs": outputs, "provisioningState": "Succeeded"}}


def _create_subscription(state: dict[str, Any], options: dict[str, list[str]]) -> Any:
    name = _one(options, "--name")
    _check_name("event subscription", name)
    topic = _topic(state, _one(options, "--resource-group"), _one(options, "--system-topic-name"))
    if "--deadletter-identity" in options and not topic.get("identity"):
        raise AzError("the system topic has no identity to dead-letter with")
    endpoint = _one(options, "--endpoint")
    subscription = {
        "name": name,
        # Azure keeps the full URL (it never returns the query string); kept here for the tests.
        "destination": {"endpointBaseUrl": endpoint.split("?")[0], "endpointUrl": endpoint},
        "options": {flag: values for flag, values in options.items() if flag != "--endpoint"},
    }
    topic["subscriptions"] = [s for s in topic["subscriptions"] if s["name"] != name]
    topic["subscriptions"].append(subscription)
    return subscription


def run(state: dict[str, Any], args: list[str]) -> Any:
    words, options = _options(args)
    command = " ".join(words)
    if command == "storage account list":
        return state["accounts"]
    if command == "eventgrid system-topic list":
        return [{k: v for k, v in t.items() if k != "subscriptions"} for t in state["topics"]]
    if command == "eventgrid system-topic delete":
        topic = _topic(state, _one(options, "--resource-group"), _one(options, "--name"))
        state["topics"].remove(topic)  # Azure deletes its subscriptions with it
        return None
    if command == "eventgrid system-topic event-subscription list":
        topic = _topic(
            state, _one(options, "--resource-group"), _one(options, "--system-topic-name")
        )
        return topic["subscriptions"]
    if command == "eventgrid system-topic event-subscription create":
        return _create_subscription(state, options)
    if command == "eventgrid system-topic event-subscription delete":
        topic = _topic(
            state, _one(options, "--resource-group"), _one(options, "--system-topic-name")
        )
        name = _one(options, "--name")
        topic["subscriptions"] = [s for s in topic["subscriptions"] if s["name"] != name]
        return None
    if command == "deployment group create":
        return _deploy(state, options)
    if command == "role assignment list":
        if state.get("hidden_role_lists", 0) > 0:
            state["hidden_role_lists"] -= 1
            return []
        scope = _one(options, "--scope").lower()
        return [r for r in state["roles"] if r["scope"].lower() == scope]
    if command == "role assignment delete":
        ids = set(options.get("--ids", []))
        state["roles"] = [r for r in state["roles"] if r["id"] not in ids]
        return None
    if command == "functionapp keys list":
        answers = state["keys"].get(_one(options, "--name"), [""])
        key = answers.pop(0) if len(answers) > 1 else answers[0]
        return {"systemKeys": {"blobs_extension": key or None}}
    raise AzError(f"fake az: unsupported command {command!r}", 2)


def _expanded(arg: str, state: dict[str, Any]) -> str:
    """``@path`` as azure-cli reads it: the file's content, less one final newline. The file's
    permission bits are kept in ``state["read_files"]``, for the tests."""
    if not arg.startswith("@") or len(arg) == 1:
        return arg
    path = Path(arg[1:])
    try:
        content = path.read_text()
        mode = path.stat().st_mode & 0o777
    except OSError as error:
        raise AzError(f"Failed to open file {arg[1:]}: {error}") from error
    state.setdefault("read_files", []).append({"path": str(path), "mode": mode})
    return content[:-1] if content.endswith("\n") else content


def main() -> int:
    args = sys.argv[1:]
    with open(os.environ["FAKE_AZ_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps(args) + "\n")
    state_file = Path(os.environ["FAKE_AZ_STATE"])
    state = json.loads(state_file.read_text())
    try:
        args = [_expanded(arg, state) for arg in args]
        _, options = _options(args)
        result = run(state, args)
        if "--query" in options:
            result = query(_one(options, "--query"), result)
        text = render(result, options.get("--output", ["json"])[0])
    except AzError as error:
        sys.stderr.write(f"ERROR: {error}\n")
        return error.code
    state_file.write_text(json.dumps(state, indent=1))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
