"""Real PostgreSQL and Redis servers from scripts/servers.sh (fixtures in tests/servers.py):
SQLAlchemy round-trips rows, redis-py SET/GET, and a Celery task runs in a real worker."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from servers import STARTED, run_script

TESTS_DIR = Path(__file__).resolve().parent
CELERY = Path(sys.executable).parent / "celery"


def test_postgres_create_insert_select(postgres_url):
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    meta = sa.MetaData()
    probe = sa.Table("servers_probe", meta,
                     sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("name", sa.String(50), nullable=False),
                     sa.Column("payload", sa.JSON))
    try:
        with engine.begin() as conn:
            assert "PostgreSQL" in conn.execute(sa.text("SELECT version()")).scalar_one()
            meta.drop_all(conn)
            meta.create_all(conn)
            conn.execute(probe.insert(), [{"name": "a", "payload": {"k": 1}},
                                          {"name": "b", "payload": [1, 2]}])
        with engine.connect() as conn:
            rows = conn.execute(sa.select(probe.c.name, probe.c.payload)
                                .order_by(probe.c.id)).all()
            assert [tuple(r) for r in rows] == [("a", {"k": 1}), ("b", [1, 2])]
            assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == "latprune"
    finally:
        with engine.begin() as conn:
            meta.drop_all(conn)
        engine.dispose()


def test_redis_set_get(redis_url):
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        assert r.ping()
        r.set("latprune:probe", "value", ex=60)
        assert r.get("latprune:probe") == b"value"
        r.delete("latprune:probe")
    finally:
        r.close()


def test_start_is_idempotent(postgres_url, redis_url):
    """Starting an already running server only prints the same URL."""
    pg_dir, pg_port = STARTED["postgres"]
    r = run_script("start-postgres", str(pg_dir), str(pg_port))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == postgres_url
    redis_dir, redis_port = STARTED["redis"]
    r = run_script("start-redis", str(redis_dir), str(redis_port))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == redis_url


def test_celery_roundtrip_through_real_worker(redis_url, tmp_path):
    from celery_probe_app import QUEUE, make_app

    env = dict(os.environ, LATPRUNE_PROBE_REDIS_URL=redis_url,
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR),
                                                        os.environ.get("PYTHONPATH")])))
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [str(CELERY), "-A", "celery_probe_app", "worker", "--pool=solo", "-c", "1",
             "-Q", QUEUE, "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--loglevel=INFO"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    app = make_app(redis_url)
    try:
        result = app.send_task("celery_probe_app.add", args=(2, 3), queue=QUEUE)
        try:
            value = result.get(timeout=60)
        except Exception as e:
            pytest.fail(f"no result from the Celery worker ({e!r}); worker exit status "
                        f"{worker.poll()}; its log:\n{log.read_text(errors='replace')[-3000:]}")
        assert value["sum"] == 5
        assert value["pid"] != os.getpid()
        assert result.successful()
    finally:
        app.close()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=5)
