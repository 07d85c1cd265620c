"""`fabric apply` as a user runs it, against a real `fabric up`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_up import UpProcess, module_fabric, one_line, until

from fabric.cli.apply_cmd import Action, diff_fields, plan
from schemas.api import Deployment, DeploymentRecord

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    yield from module_fabric(tmp_path_factory, nodes=1)


def toml_file(path: Path, deployments: list[tuple[str, int, list[str]]]) -> Path:
    parts = []
    for name, replicas, argv in deployments:
        quoted = ", ".join(f'"{a}"' for a in argv)
        parts.append(
            f"[[deployments]]\nreplicas = {replicas}\n"
            f'[deployments.spec]\nname = "{name}"\nargv = [{quoted}]\n'
            f'[deployments.spec.labels]\nowner = "apply-test"\n'
        )
    path.write_text("\n".join(parts))
    return path


def test_apply_creates_then_is_idempotent_then_updates_and_prunes(
    fabric: UpProcess, tmp_path: Path
) -> None:
    first = toml_file(tmp_path / "fleet.toml", [("ap-a", 1, SLEEP), ("ap-b", 2, SLEEP)])
    out = fabric.ok("apply", "-f", str(first))
    assert "+ ap-a  created" in out and "+ ap-b  created" in out
    assert out.splitlines()[-1] == "2 created"
    until(
        "ap-a, ap-b-0, ap-b-1 running",
        lambda: all(
            fabric.agents().get(i, {}).get("state") == "running"
            for i in ("ap-a", "ap-b-0", "ap-b-1")
        ),
    )
    pids = {i: a["pid"] for i, a in fabric.agents().items()}

    # Twice: nothing changes, nothing restarts.
    again = fabric.json("apply", "-f", str(first))
    assert [(c["name"], c["action"]) for c in again] == [
        ("ap-a", "unchanged"),
        ("ap-b", "unchanged"),
    ]
    assert {i: a["pid"] for i, a in fabric.agents().items()} == pids

    # YAML with one deployment changed and one left out: a dry run first.
    yaml_file = tmp_path / "fleet.yaml"
    yaml_file.write_text(
        "deployments:\n"
        "  - replicas: 3\n"
        "    spec:\n"
        "      name: ap-b\n"
        f"      argv: {SLEEP!r}\n".replace("'", '"')
        + "      labels: {owner: apply-test}\n"
    )
    dry = fabric.ok("apply", "-f", str(yaml_file), "--prune", "--dry-run")
    assert "~ ap-b  would be updated: replicas (2 -> 3)" in dry
    assert "- ap-a  would be removed" in dry
    assert "dry run" in dry.splitlines()[-1]
    assert "ap-a" in fabric.agents()  # nothing changed

    done = fabric.ok("apply", "-f", str(yaml_file), "--prune")
    assert "~ ap-b  updated: replicas (2 -> 3)" in done
    assert "- ap-a  removed" in done
    until(
        "ap-b-2 running and ap-a gone",
        lambda: (
            (agents := fabric.agents()).get("ap-b-2", {}).get("state") == "running"
            and "ap-a" not in agents
        ),
    )
    # Replicas alone changed: the copies already running were left alone.
    agents = fabric.agents()
    assert agents["ap-b-0"]["pid"] == pids["ap-b-0"]
    fabric.ok("rm", "ap-b")


@pytest.mark.parametrize(
    ("text", "suffix", "says"),
    [
        ("[[deployments]\n", ".toml", "not valid TOML"),
        ("deployments: [\n", ".yaml", "not valid YAML"),
        ("[[deployments]]\nreplicas = 1\n", ".toml", "spec"),
        ('[[deployments]]\n[deployments.spec]\nname = "Bad Name"\nargv = ["x"]\n', ".toml", "name"),
        ("[[agents]]\nname = 'x'\n", ".toml", "agents"),
    ],
)
def test_a_bad_file_is_one_line_and_exit_2(
    fabric: UpProcess, tmp_path: Path, text: str, suffix: str, says: str
) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    result = fabric.cli("apply", "-f", str(path))
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("fabric: error:") and says in line
    assert result.stdout == ""


def test_a_missing_file_is_exit_2(fabric: UpProcess, tmp_path: Path) -> None:
    result = fabric.cli("apply", "-f", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "no such file" in one_line(result.stderr)


def test_the_same_name_twice_is_refused(fabric: UpProcess, tmp_path: Path) -> None:
    path = toml_file(tmp_path / "twice.toml", [("ap-x", 1, SLEEP), ("ap-x", 1, SLEEP)])
    result = fabric.cli("apply", "-f", str(path))
    assert result.returncode == 2
    assert "given twice" in one_line(result.stderr)


# --- the diff, without a fabric --------------------------------------------------------


def _deployment(name: str, replicas: int = 1, **spec: object) -> Deployment:
    import msgspec

    return msgspec.convert(
        {"spec": {"name": name, "argv": ["x"], **spec}, "replicas": replicas}, Deployment
    )


def test_plan_names_the_changed_fields() -> None:
    current = {
        "a": DeploymentRecord(deployment=_deployment("a")),
        "b": DeploymentRecord(deployment=_deployment("b", env={"K": "1"})),
        "gone": DeploymentRecord(deployment=_deployment("gone")),
        "going": DeploymentRecord(deployment=_deployment("going"), deleting=True),
    }
    wanted = [_deployment("a"), _deployment("b", 2, env={"K": "2"}), _deployment("c")]
    changes = plan(wanted, current, prune=True)
    assert [(c.name, c.action, c.fields) for c in changes] == [
        ("a", Action.UNCHANGED, []),
        ("b", Action.UPDATE, ["replicas (1 -> 2)", 'spec.env.K ("1" -> "2")']),
        ("c", Action.CREATE, []),
        ("gone", Action.DELETE, []),
    ]
    assert [c.action for c in plan(wanted, current, prune=False)][-1] is Action.CREATE


def test_diff_fields_names_containers_without_their_values() -> None:
    assert diff_fields({"argv": ["a"]}, {"argv": ["a", "b"]}) == ["argv"]
    assert diff_fields({"x": {}}, {"x": {"k": 1}}) == ["x"]
    assert diff_fields({"a": 1}, {"a": 1}) == []
