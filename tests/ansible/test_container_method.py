"""roles/appliance, container method: what it renders is valid (DESIGN.md section 7).

Docker cannot run in the sandbox hosts, so the role's container tasks run here on the
controller against temporary directories with `appliance_compose_up: false`: the compose file
must pass the role's own validation (`docker compose config -q`, or Debian's docker-compose 1.x
where the v2 plugin is absent), the settings file must pass this checkout's
`appliance settings --effective`, and the compose file must pass yamllint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.ansible.local_play import run_local_play

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DIGEST = "registry.example/appliance@sha256:" + "0123456789abcdef" * 4


def _compose_validate() -> str | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return "docker compose -f %s config -q"
    if shutil.which("docker-compose"):
        return "docker-compose -f %s config -q"
    return None


pytestmark = [
    pytest.mark.skipif(
        not (VENV_BIN / "ansible-playbook").exists(), reason="ansible is not installed"
    ),
    pytest.mark.skipif(
        _compose_validate() is None,
        reason="neither `docker compose` nor docker-compose (Debian package) is installed",
    ),
]


def _render(tmp_path: Path, **overrides: object) -> subprocess.CompletedProcess[str]:
    playbook = tmp_path / "render.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Render the container method",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Render",
                            "ansible.builtin.include_role": {
                                "name": "appliance",
                                "tasks_from": "{{ item }}",
                            },
                            "loop": ["secrets.yml", "container.yml"],
                        }
                    ],
                }
            ]
        )
    )
    extra = {
        "ansible_python_interpreter": sys.executable,
        "appliance_install_method": "container",
        "appliance_version": "1.0.0",
        "appliance_image": DIGEST,
        "appliance_group": "root",
        "appliance_compose_dir": str(tmp_path / "compose"),
        "appliance_config_dir": str(tmp_path / "etc"),
        "appliance_models_dir": str(tmp_path / "models"),
        "appliance_engines_dir": str(tmp_path / "engines"),
        "appliance_fact_file": str(tmp_path / "facts" / "appliance.fact"),
        "appliance_compose_up": False,
        "appliance_api_token": "container-token",
        "appliance_port": 18090,
        "appliance_settings": {"rec_batch_size": 2, "force_fp16": True},
        "appliance_compose_validate": _compose_validate(),
        **overrides,
    }
    (tmp_path / "etc").mkdir(exist_ok=True)
    return run_local_play(playbook, extra, tmp_path, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))


@pytest.mark.timeout(300)
def test_container_method_renders_a_valid_compose_project(tmp_path: Path) -> None:
    proc = _render(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    compose = yaml.safe_load((tmp_path / "compose" / "compose.yml").read_text())
    service = compose["services"]["appliance"]
    assert service["image"] == DIGEST
    assert service["runtime"] == "nvidia"
    assert service["restart"] == "unless-stopped"
    assert service["ports"] == ["18090:18090"]
    assert "/health/ready" in " ".join(service["healthcheck"]["test"])
    assert f"{tmp_path}/engines:/engines" in service["volumes"]
    assert service["env_file"] == [f"{tmp_path}/etc/secrets.env"]
    # The token is only in the 0640 secrets file, never in the settings or the compose file.
    secrets = tmp_path / "etc" / "secrets.env"
    assert "API_TOKEN=container-token" in secrets.read_text()
    assert oct(secrets.stat().st_mode & 0o777) == "0o640"
    assert "container-token" not in (tmp_path / "compose" / "compose.yml").read_text()
    assert "container-token" not in proc.stdout
    # The settings file is what this checkout's appliance accepts, with the container's paths.
    settings = subprocess.run(
        [
            str(VENV_BIN / "appliance"),
            "settings",
            "--effective",
            "--config",
            str(tmp_path / "etc" / "appliance.toml"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    effective = json.loads(settings.stdout)
    assert (effective["models_dir"], effective["engines_dir"], effective["port"]) == (
        "/models",
        "/engines",
        18090,
    )
    assert effective["rec_batch_size"] == 2
    lint = subprocess.run(
        [
            str(VENV_BIN / "yamllint"),
            "-d",
            "{extends: default, rules: {line-length: {max: 240}}}",
            str(tmp_path / "compose" / "compose.yml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout


@pytest.mark.timeout(300)
def test_container_method_refuses_a_compose_file_that_does_not_validate(tmp_path: Path) -> None:
    # A port the compose schema refuses: the role's validation must stop the run before the file
    # is written (so the check above is not a rubber stamp).
    proc = _render(tmp_path, appliance_port="not-a-port")
    assert proc.returncode != 0
    assert "failed to validate" in proc.stdout, proc.stdout[-3000:]
    assert not (tmp_path / "compose" / "compose.yml").exists()
