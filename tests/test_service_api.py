"""HTTP API of the service (service/app.py, service/routes): auth, owner scoping, streamed
uploads and their limits, job validation, rate limits, cancel, artifacts, tables, health.

Most tests replace the in-process worker pool by a stub and `enqueue` by a no-op, so jobs stay
queued; `test_optimize_job_end_to_end` runs one real (tiny) job through the real pool.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from latprune.service import worker
from latprune.service.app import create_app
from latprune.service.auth import create_token
from latprune.service.db import Artifact, Job, session_scope
from latprune.service.settings import Settings
from onnx_builders import residual_cnn


class StubPool:
    """Stands in for worker.WorkerPool: runs nothing (jobs stay queued)."""

    def __init__(self, settings) -> None:
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self, timeout: float = 10.0) -> None:
        self.running = False

    def wake(self) -> None:
        pass

    def alive(self) -> bool:
        return self.running


@dataclass
class Api:
    client: TestClient
    settings: Settings

    def token(self, user: str = "alice", role: str = "user") -> dict[str, str]:
        with session_scope(self.settings.db_url) as s:
            return {"Authorization": f"Bearer {create_token(s, user, role)}"}

    def upload_model(self, headers: dict, data: bytes, name: str = "m.onnx"):
        return self.client.post("/v1/models", params={"name": name}, content=data,
                                headers={**headers, "Content-Type": "application/octet-stream"})


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return residual_cnn().SerializeToString()


@pytest.fixture
def make_api(tmp_path, monkeypatch):
    """make_api(real_pool=False, **settings) -> Api (the app's lifespan runs until the test ends)."""
    for var in ("LATPRUNE_DATABASE_URL", "LATPRUNE_DATA_DIR", "LATPRUNE_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    clients = []

    def make(real_pool: bool = False, **kw) -> Api:
        if not real_pool:
            monkeypatch.setattr(worker, "WorkerPool", StubPool)
            monkeypatch.setattr(worker, "enqueue", lambda settings, job_id, device: None)
        home = tmp_path / f"home{len(clients)}"
        settings = Settings(home=home, **kw)
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return Api(client, settings)

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def assert_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["status"] == status and body["error"]["message"], body
    return body["error"]


def tmp_files(api: Api) -> list[Path]:
    return list((api.settings.data_path / "tmp").iterdir())


# --- auth ------------------------------------------------------------------------------------

def test_auth_required(make_api):
    api = make_api()
    c = api.client
    err = assert_error(c.get("/v1/models"), 401)
    assert "bearer" in err["message"].lower()
    assert c.get("/v1/models").headers["www-authenticate"] == "Bearer"
    assert_error(c.get("/v1/models", headers={"Authorization": "Bearer lp_nottherealtoken"}), 401)
    assert_error(c.get("/v1/jobs", headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"}), 401)
    assert_error(c.get("/v1/devices", headers={"Authorization": "Bearer " + "x" * 5000}), 401)
    assert_error(c.post("/v1/jobs", json={"model_id": "mdl_0", "speedup": 2}), 401)
    assert_error(c.post("/v1/models", content=b"x"), 401)
    assert c.get("/v1/models", headers=api.token()).json() == []


# --- models ----------------------------------------------------------------------------------

def test_upload_model_summary_and_scoping(make_api, model_bytes):
    api = make_api()
    c = api.client
    alice, bob = api.token("alice"), api.token("bob")
    r = api.upload_model(alice, model_bytes, name="resnet\x00 tiny\n" + "x" * 1000)
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["size_bytes"] == len(model_bytes) and len(m["sha256"]) == 64
    assert m["name"].startswith("resnet tiny x") and len(m["name"]) == 255
    s = m["summary"]
    assert s["conv_layers"] == 8 and s["prunable"] is True and s["inputs"][0]["shape"] == [1, 3, 16, 16]
    assert (api.settings.data_path / "models" / f"{m['id']}.onnx").read_bytes() == model_bytes
    assert tmp_files(api) == []

    # the same file again: the existing record, not a duplicate
    again = api.upload_model(alice, model_bytes)
    assert again.status_code == 200 and again.json()["id"] == m["id"]
    assert [x["id"] for x in c.get("/v1/models", headers=alice).json()] == [m["id"]]
    assert c.get(f"/v1/models/{m['id']}", headers=alice).json()["summary"] == s

    # another user sees nothing of it
    assert c.get("/v1/models", headers=bob).json() == []
    assert_error(c.get(f"/v1/models/{m['id']}", headers=bob), 404)
    assert_error(c.delete(f"/v1/models/{m['id']}", headers=bob), 404)
    assert_error(c.post("/v1/jobs", json={"model_id": m["id"], "speedup": 1.5}, headers=bob), 404)
    # bob's own upload of the same bytes is his own record
    assert api.upload_model(bob, model_bytes).json()["id"] != m["id"]

    assert c.delete(f"/v1/models/{m['id']}", headers=alice).status_code == 204
    assert not (api.settings.data_path / "models" / f"{m['id']}.onnx").exists()
    assert_error(c.get(f"/v1/models/{m['id']}", headers=alice), 404)


@pytest.mark.parametrize("data", [b"not an onnx model at all", b"\x08\x07\x12\x00" * 64, b""])
def test_bad_model_bytes_400(make_api, data):
    api = make_api()
    err = assert_error(api.upload_model(api.token(), data), 400)
    assert "Traceback" not in err["message"]
    assert tmp_files(api) == []
    assert list((api.settings.data_path / "models").iterdir()) == []


def test_upload_over_limit_413(make_api):
    api = make_api(max_upload_mb=1)
    h = {**api.token(), "Content-Type": "application/octet-stream"}
    big = b"\0" * (2 * 2**20)
    assert_error(api.client.post("/v1/models", content=big, headers=h), 413)
    assert tmp_files(api) == []

    # chunked, no Content-Length: the limit is counted while streaming
    def chunks():
        for _ in range(32):
            yield b"\0" * 65536

    assert_error(api.client.post("/v1/models", content=chunks(), headers=h), 413)
    assert_error(api.client.post("/v1/calibration", content=chunks(), headers=h), 413)
    assert tmp_files(api) == []
    assert list((api.settings.data_path / "models").iterdir()) == []


def test_calibration_upload(make_api):
    api = make_api()
    alice, bob = api.token("alice"), api.token("bob")
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 3, 16, 16), np.float32))
    h = {**alice, "Content-Type": "application/octet-stream"}
    r = api.client.post("/v1/calibration", params={"name": "calib"}, content=buf.getvalue(), headers=h)
    assert r.status_code == 201, r.text
    cal = r.json()
    assert cal["summary"]["samples"] == 4 and cal["summary"]["layout"] == "NCHW float"
    assert_error(api.client.get(f"/v1/calibration/{cal['id']}", headers=bob), 404)
    assert api.client.get("/v1/calibration", headers=bob).json() == []
    assert_error(api.client.post("/v1/calibration", content=b"PK\x03\x04junk", headers=h), 400)
    assert tmp_files(api) == []
    assert api.client.delete(f"/v1/calibration/{cal['id']}", headers=alice).status_code == 204


# --- jobs ------------------------------------------------------------------------------------

@pytest.fixture
def queued_api(make_api, model_bytes):
    """An app whose jobs stay queued, with alice's model uploaded."""
    api = make_api()
    h = api.token("alice")
    mid = api.upload_model(h, model_bytes).json()["id"]
    return api, h, mid


def test_job_submission_validation(queued_api):
    api, h, mid = queued_api
    c = api.client
    bob = api.token("bob")
    cases = [
        ({"model_id": mid}, 422, "exactly one budget"),
        ({"model_id": mid, "budget_ms": 1.0, "speedup": 2.0}, 422, "exactly one budget"),
        ({"model_id": mid, "speedup": -1}, 422, "speedup"),
        ({"model_id": mid, "budget_ms": 0}, 422, "budget_ms"),
        ({"model_id": mid, "flops_ratio": 1.5}, 422, "flops_ratio"),
        ({"model_id": mid, "speedup": 2, "method": "magic"}, 422, "method"),
        ({"model_id": mid, "speedup": 2, "threads": 0}, 422, "threads"),
        ({"model_id": mid, "speedup": 2, "threads": 10**30}, 422, "threads"),
        ({"model_id": mid, "speedup": "2"}, 422, "speedup"),
        ({"model_id": mid, "speedup": 2, "threads": True}, 422, "threads"),
        ({"model_id": mid, "speedup": 2, "lut_path": "/etc/passwd"}, 422, "lut_path"),
        ({"model_id": mid, "speedup": 2, "objective": "distortion"}, 422, "calibration"),
        ({"model_id": mid, "kind": "profile", "speedup": 2}, 422, "no budget"),
        ({"model_id": mid, "kind": "reprofile"}, 422, "kind"),
        ({"model_id": ["x"], "speedup": 2}, 422, "model_id"),
        ({"model_id": "mdl_00000000000000000000", "speedup": 2}, 404, "model"),
        ({"model_id": "../../etc/passwd", "speedup": 2}, 404, "model"),
        ({"model_id": mid, "speedup": 2, "device": "no-such-device"}, 404, "device"),
        ({"model_id": mid, "speedup": 2, "device": "../x"}, 404, "device"),
        ({"model_id": mid, "speedup": 2, "calibration_id": "cal_00000000000000000000"}, 404, "calibration"),
        ([1, 2], 422, ""),
        ("just a string", 422, ""),
    ]
    for body, status, word in cases:
        err = assert_error(c.post("/v1/jobs", json=body, headers=h), status)
        assert word in err["message"], (body, err)
    # non-finite numbers, non-UTF-8 and broken JSON are 4xx, never 500
    for raw in (b'{"model_id": "%s", "speedup": NaN}' % mid.encode(),
                b'{"model_id": "%s", "budget_ms": Infinity}' % mid.encode(),
                b'{"model_id": "%s", "budget_ms": 1e999}' % mid.encode(),
                b'{"model_id": "\xff\xfe", "speedup": 2}', b'{"model_id": ', b"[" * 5000):
        r = c.post("/v1/jobs", content=raw, headers={**h, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500 and r.json()["error"]["status"] == r.status_code, (raw[:40], r.text)
    assert "details" in assert_error(c.post("/v1/jobs", json={"model_id": mid, "speedup": 2, "bogus": 1},
                                            headers=h), 422)
    assert c.get("/v1/jobs", headers=h).json() == []  # nothing was queued
    # bob may not use alice's model
    assert_error(c.post("/v1/jobs", json={"model_id": mid, "speedup": 2}, headers=bob), 404)
    # the valid job
    r = c.post("/v1/jobs", json={"model_id": mid, "speedup": 1.5, "method": "dp"}, headers=h)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["device"] == api.settings.local_device
    assert job["options"]["speedup"] == 1.5 and job["options"]["method"] == "dp"
    assert "model_id" not in job["options"]


def test_job_rate_limit_429(make_api, model_bytes):
    api = make_api(jobs_per_minute=2)
    h = api.token()
    mid = api.upload_model(h, model_bytes).json()["id"]
    for _ in range(2):
        assert api.client.post("/v1/jobs", json={"model_id": mid, "speedup": 2}, headers=h).status_code == 201
    r = api.client.post("/v1/jobs", json={"model_id": mid, "speedup": 2}, headers=h)
    assert_error(r, 429)
    assert 1 <= int(r.headers["retry-after"]) <= 60
    # another token (of the same user) has its own window
    assert api.client.post("/v1/jobs", json={"model_id": mid, "speedup": 2},
                           headers=api.token()).status_code == 201


def test_cancel_queued_job(queued_api):
    api, h, mid = queued_api
    c = api.client
    job = c.post("/v1/jobs", json={"model_id": mid, "budget_ms": 0.1}, headers=h).json()
    assert_error(c.post(f"/v1/jobs/{job['id']}/cancel", headers=api.token("bob")), 404)
    assert_error(c.delete(f"/v1/models/{mid}", headers=h), 409)  # a queued job uses it
    r = c.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled" and r.json()["finished_at"] is not None
    assert c.get(f"/v1/jobs/{job['id']}", headers=h).json()["state"] == "cancelled"
    assert_error(c.post(f"/v1/jobs/{job['id']}/cancel", headers=h), 409)
    assert [j["id"] for j in c.get("/v1/jobs", params={"state": "cancelled"}, headers=h).json()] == [job["id"]]
    assert c.get("/v1/jobs", params={"state": "queued"}, headers=h).json() == []
    for params in ({"state": "bogus"}, {"limit": -1}, {"limit": 0}, {"limit": 201}, {"limit": "9" * 400}):
        assert_error(c.get("/v1/jobs", params=params, headers=h), 422)
    # a running job is marked for its worker to stop
    job2 = c.post("/v1/jobs", json={"model_id": mid, "speedup": 2}, headers=h).json()
    with session_scope(api.settings.db_url) as s:
        s.get(Job, job2["id"]).state = "running"
    r = c.post(f"/v1/jobs/{job2['id']}/cancel", headers=h)
    assert r.json()["state"] == "running" and r.json()["cancel_requested"] is True
    # the model is free again once no job is queued or running
    with session_scope(api.settings.db_url) as s:
        s.get(Job, job2["id"]).state = "cancelled"
    assert c.delete(f"/v1/models/{mid}", headers=h).status_code == 204
    assert c.get(f"/v1/jobs/{job['id']}", headers=h).json()["model_id"] is None


def test_artifacts_and_traversal(queued_api):
    api, h, mid = queued_api
    c = api.client
    job = c.post("/v1/jobs", json={"model_id": mid, "speedup": 2}, headers=h).json()
    jid = job["id"]
    job_dir = api.settings.data_path / "jobs" / jid
    job_dir.mkdir(parents=True)
    (job_dir / "report.json").write_text('{"dense_ms": 1.0}')
    with session_scope(api.settings.db_url) as s:
        s.add(Artifact(job_id=jid, name="report.json", size_bytes=17, sha256="0" * 64, media_type="application/json"))
    r = c.get(f"/v1/jobs/{jid}/artifacts/report.json", headers=h)
    assert r.status_code == 200 and r.json() == {"dense_ms": 1.0}
    assert r.headers["content-type"].startswith("application/json")
    assert [a["name"] for a in c.get(f"/v1/jobs/{jid}/artifacts", headers=h).json()] == ["report.json"]
    assert c.get(f"/v1/jobs/{jid}", headers=h).json()["artifacts"][0]["url"] == f"/v1/jobs/{jid}/artifacts/report.json"
    for name in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "..%2f..%2fservice.sqlite", "%2e%2e", "plan.json",
                 "pruned.onnx", "report.json%00", "REPORT.JSON", "x" * 3000):
        r = c.get(f"/v1/jobs/{jid}/artifacts/{name}", headers=h)
        assert r.status_code == 404, (name, r.status_code)
        assert r.json()["error"]["status"] == 404
    assert_error(c.get(f"/v1/jobs/{jid}/artifacts/report.json", headers=api.token("bob")), 404)


def test_bad_ids_404(make_api):
    api = make_api()
    c = api.client
    h = api.token()
    for path in ("/v1/models/abc", "/v1/models/mdl_" + "0" * 20, "/v1/models/MDL_ZZ", "/v1/models/" + "a" * 5000,
                 "/v1/models/%00", "/v1/models/%ff%fe", "/v1/calibration/cal_..%2F..%2Fx",
                 "/v1/jobs/job_xyz", "/v1/jobs/job_00000000000000000000/artifacts",
                 "/v1/jobs/..%2F..%2Fetc/artifacts/report.json", "/v1/devices/..", "/v1/devices/.hidden",
                 "/v1/devices/" + "d" * 100, "/v1/devices/no-such/tables", "/v1/devices/%2e%2e/tables/export",
                 "/v1/nothing-here"):
        r = c.get(path, headers=h)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert r.json()["error"]["status"] == 404
    assert_error(c.delete("/v1/models/abc", headers=h), 404)
    assert_error(c.post("/v1/jobs/abc/cancel", headers=h), 404)
    assert_error(c.patch("/v1/models", headers=h), 405)


# --- limits ----------------------------------------------------------------------------------

def test_oversized_json_body_413(make_api):
    api = make_api(max_body_kb=1)
    h = {**api.token(), "Content-Type": "application/json"}
    body = json.dumps({"model_id": "mdl_" + "0" * 20, "speedup": 2, "method": "x" * 4000}).encode()
    assert_error(api.client.post("/v1/jobs", content=body, headers=h), 413)

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model_id": "'
        for _ in range(10):
            yield b"a" * 512
        yield b'"}'

    assert_error(api.client.post("/v1/jobs", content=chunks(), headers=h), 413)
    assert_error(api.client.put("/v1/devices/farm-1", content=chunks(), headers=h), 413)
    # small bodies still pass the limit
    assert_error(api.client.post("/v1/jobs", json={"model_id": "mdl_" + "0" * 20, "speedup": 2}, headers=h), 404)


def test_query_values(queued_api):
    api, h, mid = queued_api
    c = api.client
    assert_error(api.upload_model(h, b"x", name="n" * 5000), 422)
    assert_error(c.get("/v1/models", params={"limit": "lots"}, headers=h), 422)
    assert_error(c.get("/v1/models?limit=%ff", headers=h), 422)
    r = c.get("/v1/models?limit=5&name=%ff%fe%00", headers=h)
    assert r.status_code == 200
    # a name that is not UTF-8 (or only control characters) still gives a printable display name
    r = c.post("/v1/models?name=%ff%fe%00%0a", content=residual_cnn(seed=1).SerializeToString(),
               headers={**h, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] and r.json()["name"].isprintable()
    # 405 names every method the path serves
    r = c.request("OPTIONS", f"/v1/models/{mid}", headers=h)
    assert_error(r, 405)
    assert {"GET", "DELETE"} <= set(r.headers["allow"].replace(" ", "").split(","))


# --- devices and tables ----------------------------------------------------------------------

def _table(ms: float = 0.5) -> dict:
    sig = {"op": "Conv", "kernel": [3, 3], "stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1],
           "depthwise": False, "input_hw": [16, 16], "batch": 1, "dtype": "float32"}
    return {"format": "latprune-lut", "version": 1,
            "tables": [{"fingerprint": {"device": "gpu", "gpu": "Test GPU", "threads": 1},
                        "cells": [{"signature": sig, "c_in": 8, "c_out": 8, "ms": ms, "runs": 10,
                                   "measured_at": 1.0},
                                  {"signature": sig, "c_in": 8, "c_out": 16, "ms": 2 * ms, "runs": 10,
                                   "measured_at": 1.0}],
                        "calibration": []}]}


def test_devices_and_tables(make_api):
    api = make_api()
    c = api.client
    user, agent = api.token("alice"), api.token("farm", role="agent")
    local = api.settings.local_device
    devs = {d["name"]: d for d in c.get("/v1/devices", headers=user).json()}
    assert devs[local]["executor"] == "inprocess" and devs[local]["backend"] == "ort-cpu"
    # OpenVINO (a test dependency) gives the server a second in-process device
    assert set(devs) == {local, f"{local}-openvino"}
    assert devs[f"{local}-openvino"]["backend"] == "openvino"
    assert devs[f"{local}-openvino"]["fingerprint"]["runtime"].startswith("openvino")
    assert c.get(f"/v1/devices/{local}", headers=user).json()["tables"] == []

    reg = {"backend": "tensorrt", "fingerprint": {"gpu": "Test GPU"}, "has_tensorrt": True}
    assert_error(c.put("/v1/devices/farm-1", json=reg, headers=user), 403)
    assert_error(c.put(f"/v1/devices/{local}", json=reg, headers=agent), 409)
    assert_error(c.put("/v1/devices/farm-1", json={**reg, "executor": "ssh"}, headers=agent), 422)
    assert_error(c.put("/v1/devices/farm-1", content=b'{"fingerprint": {"x": NaN}}',
                       headers={**agent, "Content-Type": "application/json"}), 422)
    assert_error(c.put("/v1/devices/bad%20name", json=reg, headers=agent), 422)
    assert_error(c.put("/v1/devices/farm-1", json={**reg, "backend": "coreml"}, headers=agent), 422)
    r = c.put("/v1/devices/farm-1", json=reg, headers=agent)
    assert r.status_code == 201 and r.json()["queue"] == "device.farm-1" and r.json()["executor"] == "celery"
    assert c.put("/v1/devices/farm-1", json=reg, headers=agent).status_code == 200

    assert_error(c.post("/v1/devices/farm-1/tables", json=_table(), headers=user), 403)
    assert_error(c.post("/v1/devices/nope/tables", json=_table(), headers=agent), 404)
    ah = {**agent, "Content-Type": "application/json"}
    for raw in (b"{not json", b"\xff\xfe", b"[]", b'{"format": "other"}',
                json.dumps(_table()).replace("0.5", "NaN").encode(),
                json.dumps(_table()).replace('"tables": [{', '"tables": [7, {').encode(),
                json.dumps(_table()).replace('"c_in": 8', '"c_in": "8"').encode()):
        err = assert_error(c.post("/v1/devices/farm-1/tables", content=raw, headers=ah), 400)
        assert "Traceback" not in err["message"]
    bad = _table(ms=-1.0)
    err = assert_error(c.post("/v1/devices/farm-1/tables", json=bad, headers=agent), 400)
    assert err["details"] and "latency" in err["details"][0]

    r = c.post("/v1/devices/farm-1/tables", json=_table(), headers=agent)
    assert r.status_code == 200, r.text
    assert r.json()["cells"] == 2 and r.json()["flagged"] is False
    r = c.post("/v1/devices/farm-1/tables", json=_table(ms=1.0), headers=agent)  # twice as slow: drift
    assert r.status_code == 200 and r.json()["flagged"] is True

    t = c.get("/v1/devices/farm-1/tables", headers=user).json()
    assert t["summary"][0]["cells"] == 2 and [u["flagged"] for u in t["uploads"]] == [True, False]
    assert c.get("/v1/devices/farm-1", headers=user).json()["tables"][0]["cells"] == 2
    r = c.get("/v1/devices/farm-1/tables/export", headers=user)
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    assert r.json()["format"] == "latprune-lut" and len(r.json()["tables"][0]["cells"]) == 2
    assert c.get(f"/v1/devices/{local}/tables/export", headers=user).json()["tables"] == []


def test_table_upload_limit(make_api):
    api = make_api(max_table_upload_mb=1)
    agent = api.token("farm", role="agent")
    api.client.put("/v1/devices/farm-1", json={"backend": "ort-cpu"}, headers=agent)
    big = b'{"format": "latprune-lut", "version": 1, "tables": [], "pad": "' + b"a" * (2 * 2**20) + b'"}'
    r = api.client.post("/v1/devices/farm-1/tables", content=big, headers={**agent, "Content-Type": "application/json"})
    assert_error(r, 413)


# --- health, metrics, docs -------------------------------------------------------------------

def test_health_ready_metrics_docs(make_api):
    api = make_api()
    c = api.client
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert set(r.json()["checks"]) == {"database", "data_dir", "worker"}
    c.get("/v1/models/abc", headers=api.token())
    text = c.get("/metrics").text
    assert 'latprune_http_requests_total{method="GET",route="/v1/models/{model_id}",status="404"} 1.0' in text
    assert 'latprune_jobs{state="queued"} 0.0' in text
    assert "latprune_http_request_duration_seconds_bucket" in text
    spec = c.get("/openapi.json").json()
    assert {"/v1/models", "/v1/jobs", "/v1/jobs/{job_id}/artifacts/{name}", "/v1/devices/{name}/tables"} <= set(spec["paths"])
    assert "ErrorOut" in spec["components"]["schemas"]
    assert c.get("/docs").status_code == 200

    api.client.app.state.pool.running = False
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["worker"] != "ok"


def test_two_apps_in_one_process(make_api):
    a, b = make_api(), make_api()
    a.client.get("/healthz")
    assert "/healthz" in a.client.get("/metrics").text
    assert "/healthz" not in b.client.get("/metrics").text


# --- one real job ----------------------------------------------------------------------------

def test_optimize_job_end_to_end(make_api, model_bytes):
    api = make_api(real_pool=True)
    c = api.client
    h = api.token()
    mid = api.upload_model(h, model_bytes).json()["id"]
    r = c.post("/v1/jobs", json={"model_id": mid, "flops_ratio": 0.6, "method": "dp", "rounds": 1}, headers=h)
    assert r.status_code == 201, r.text
    jid = r.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{jid}", headers=h).json()
        if job["state"] not in ("queued", "running"):
            break
        time.sleep(0.25)
    assert job["state"] == "succeeded", job
    names = {a["name"] for a in job["artifacts"]}
    assert {"pruned.onnx", "plan.json", "report.json"} <= names
    report = c.get(f"/v1/jobs/{jid}/artifacts/report.json", headers=h).json()
    assert report["measured_ms"] > 0 and report["dense_ms"] > 0
    pruned = c.get(f"/v1/jobs/{jid}/artifacts/pruned.onnx", headers=h)
    assert pruned.status_code == 200 and pruned.headers["content-type"] == "application/octet-stream"
    assert len(pruned.content) < len(model_bytes)
    assert_error(c.post(f"/v1/jobs/{jid}/cancel", headers=h), 409)
    assert 'latprune_jobs{state="succeeded"} 1.0' in c.get("/metrics").text


def test_celery_executor_registers_no_local_device(make_api, monkeypatch):
    """With Celery, the default device is a farm device its agent registers; readyz pings Redis."""
    api = make_api(executor="celery", redis_url="redis://127.0.0.1:1/0")
    c = api.client
    assert c.get("/v1/devices", headers=api.token()).json() == []
    agent = api.token("farm", role="agent")
    r = c.put(f"/v1/devices/{api.settings.local_device}", json={"backend": "onnxruntime-cpu"}, headers=agent)
    assert r.status_code == 201 and r.json()["executor"] == "celery"
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["redis"] != "ok"


def test_review_findings_stay_fixed(make_api, model_bytes):
    """Inputs a review found to break the API: stored lone surrogates, integers past float,
    agents registering in-process devices, jobs nobody would run."""
    api = make_api()
    c = api.client
    user, agent = api.token("alice"), api.token("farm", role="agent")
    ah = {**agent, "Content-Type": "application/json"}
    assert c.put("/v1/devices/farm-1", json={"backend": "ort-cpu"}, headers=agent).status_code == 201
    surrogate = json.dumps(_table()).replace('"fingerprint": {', '"fingerprint": {"a": "\\ud800", ', 1)
    huge = json.dumps(_table()).replace('"runs": 10', '"runs": 1' + "0" * 400, 1)
    no_tables = '{"format": "latprune-lut", "version": 1}'  # found by schemathesis (was a 500)
    no_cells = '{"format": "latprune-lut", "version": 1, "tables": [{"fingerprint": {}}]}'
    for raw in (surrogate, huge, no_tables, no_cells):
        assert_error(c.post("/v1/devices/farm-1/tables", content=raw.encode(), headers=ah), 400)
    for path in ("/v1/devices/farm-1", "/v1/devices/farm-1/tables", "/v1/devices/farm-1/tables/export"):
        assert c.get(path, headers=user).status_code == 200, path
    assert_error(c.put("/v1/devices/evil", json={"backend": "x", "executor": "inprocess"}, headers=agent), 422)


def test_in_process_device_refused_when_no_pool_runs(make_api, model_bytes):
    api = make_api(executor="celery", redis_url="redis://127.0.0.1:1/0")
    from latprune.service.db import Device
    with session_scope(api.settings.db_url) as s:
        s.add(Device(name="old-local", executor="inprocess"))
    user = api.token()
    model = api.upload_model(user, model_bytes).json()
    err = assert_error(api.client.post("/v1/jobs", json={"model_id": model["id"], "speedup": 1.5,
                                                          "device": "old-local"}, headers=user), 409)
    assert "executor" in err["message"]
