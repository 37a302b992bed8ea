"""docker/: no Docker engine runs here, so every command the images and the compose file run
is exercised natively instead: the compose stack (API with the Celery executor on PostgreSQL
and Redis, a CPU device agent) runs a job end to end, and the files are checked against the
CLI, the settings and the package layout."""
from __future__ import annotations

import re
import subprocess
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

from latprune.service.settings import Settings
from service_server import LATPRUNE, Server

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def _json_list(dockerfile: str, instruction: str) -> list[str]:
    m = re.search(rf"^{instruction} (\[.*\])$", dockerfile, re.M)
    return yaml.safe_load(m[1]) if m else []


def _commands() -> dict[str, list[str]]:
    """Every command line the images and compose services run."""
    agent = _dockerfile("Dockerfile.agent")
    cmds = {"Dockerfile.api CMD": _json_list(_dockerfile("Dockerfile.api"), "CMD"),
            "Dockerfile.agent": _json_list(agent, "ENTRYPOINT") + _json_list(agent, "CMD")}
    for name, svc in _compose()["services"].items():
        if "latprune" in str(svc.get("image", "")) or "Dockerfile" in str(svc.get("build", "")):
            cmd = svc.get("command", [])
            if name == "gpu-agent":
                cmd = _json_list(agent, "ENTRYPOINT") + cmd
            cmds[f"compose {name}"] = cmd
    return cmds


def test_every_command_is_a_latprune_command_that_parses():
    cmds = _commands()
    assert set(cmds) >= {"compose api", "compose worker", "compose beat", "compose gpu-agent"}
    for where, cmd in cmds.items():
        assert cmd[:1] == ["latprune"], where
        proc = subprocess.run([LATPRUNE, *cmd[1:2], "--help"], capture_output=True, text=True)
        assert proc.returncode == 0, (where, proc.stderr)
        options = re.findall(r"--[a-z-]+", " ".join(cmd[2:]))
        for opt in options:
            assert opt in proc.stdout, (where, opt)


def test_compose_environment_names_real_settings():
    env = _compose()["x-latprune-env"]
    fields = {f"LATPRUNE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    assert Settings(**{k[len("LATPRUNE_"):].lower(): v for k, v in env.items()}).executor == "celery"


def test_images_copy_every_package_and_install_known_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = set(project["tool"]["setuptools"]["package-dir"].values())
    extras = set(project["project"]["optional-dependencies"])
    for name in ("Dockerfile.api", "Dockerfile.agent"):
        text = _dockerfile(name)
        copied = set(re.findall(r"^COPY (\w+) \1$", text, re.M))
        assert dirs <= copied, (name, dirs - copied)
        for extra in re.findall(r'"\.\[([\w,]+)\]"', text):
            assert set(extra.split(",")) <= extras, (name, extra)


def test_compose_stack_runs_a_job_natively(tmp_path, postgres_url, redis_url):
    """API (executor celery, PostgreSQL) + `latprune agent --device cpu-0` (the compose worker's
    command) + Redis: a profile job submitted over HTTP runs on the agent."""
    from test_service_worker import fresh_database

    fresh_database(postgres_url)
    env = {k: str(v) for k, v in _compose()["x-latprune-env"].items()}
    env.update(LATPRUNE_DATABASE_URL=postgres_url, LATPRUNE_REDIS_URL=redis_url.rsplit("/", 1)[0] + "/5")
    srv = Server(tmp_path, **{k: v for k, v in env.items() if k != "LATPRUNE_HOME"}).start()
    worker_cmd = _compose()["services"]["worker"]["command"]
    agent = subprocess.Popen([LATPRUNE, *worker_cmd[1:]], env=srv.env, stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "agent.log", "wb"))
    try:
        auth = {"Authorization": f"Bearer {srv.token('me')}"}
        from onnx_builders import residual_cnn
        model = httpx.post(srv.url + "/v1/models", content=residual_cnn().SerializeToString(), headers=auth,
                           timeout=60).json()
        deadline = time.monotonic() + 60
        while not any(d["name"] == "cpu-0" for d in httpx.get(srv.url + "/v1/devices", headers=auth).json()):
            assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "agent.log").read_text()[-2000:]
            time.sleep(0.3)
        job = httpx.post(srv.url + "/v1/jobs", json={"kind": "profile", "model_id": model["id"]}, headers=auth)
        assert job.status_code == 201, job.text
        assert job.json()["device"] == "cpu-0"
        while (state := httpx.get(f"{srv.url}/v1/jobs/{job.json()['id']}", headers=auth).json())["state"] in (
                "queued", "running"):
            assert time.monotonic() < deadline + 120, state
            time.sleep(0.3)
        assert state["state"] == "succeeded", state
        tables = httpx.get(srv.url + "/v1/devices/cpu-0/tables", headers=auth).json()
        assert tables["summary"] and tables["summary"][0]["cells"] > 0
    finally:
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
        srv.stop()
