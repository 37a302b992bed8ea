"""/v1/devices: the target devices (the server's CPU and farm devices served by agents)."""
from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from sqlalchemy import select

from latprune.service.db import Device, now
from latprune.service.routes.deps import (AgentDep, ApiError, CallerDep, SessionDep, SettingsDep, StorageDep,
                                          device_name, error_responses, not_found)
from latprune.service.schemas import DeviceDetail, DeviceOut, DeviceRegister
from latprune.service.storage import Storage, checked_device
from latprune.types import InputError

log = logging.getLogger("latprune.service.api")

router = APIRouter(prefix="/v1/devices", tags=["devices"], responses=error_responses(401))


def device_out(row: Device) -> DeviceOut:
    return DeviceOut(name=row.name, backend=row.backend, executor=row.executor, queue=row.queue,
                     fingerprint=row.fingerprint or {}, has_tensorrt=bool(row.has_tensorrt),
                     last_seen_at=row.last_seen_at)


def table_summary(storage: Storage, name: str) -> list[dict]:
    """lut.exchange.summary of the device's table file, [] when it has none (or it is unreadable)."""
    from latprune.lut.exchange import summary

    path = storage.lut_path(name)
    if not path.is_file():
        return []
    try:
        return summary(path)
    except InputError as exc:
        log.warning("latency table of %s unreadable: %s", name, exc)
        return []


def existing_device(session, name: str) -> Device:
    row = session.get(Device, device_name(name))
    if row is None:
        raise not_found(f"device {name!r}")
    return row


@router.get("", response_model=list[DeviceOut])
def list_devices(session: SessionDep, caller: CallerDep) -> list[DeviceOut]:
    """Every registered device, by name."""
    return [device_out(d) for d in session.scalars(select(Device).order_by(Device.name)).all()]


@router.get("/{name}", response_model=DeviceDetail, responses=error_responses(404))
def get_device(name: str, session: SessionDep, caller: CallerDep, storage: StorageDep) -> DeviceDetail:
    """A device, with the summary of its latency table."""
    row = existing_device(session, name)
    return DeviceDetail(**device_out(row).model_dump(), tables=table_summary(storage, row.name))


@router.put("/{name}", response_model=DeviceOut, responses={201: {"model": DeviceOut, "description": "registered"},
                                                            **error_responses(403, 404, 409, 422)})
def register_device(name: str, body: DeviceRegister, response: Response, session: SessionDep,
                    caller: AgentDep, settings: SettingsDep) -> DeviceOut:
    """Register or update a farm device (agent tokens only). Its jobs go to the Celery queue
    `device.<name>`."""
    try:
        name = checked_device(name)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    if name == settings.local_device and settings.executor == "inprocess":
        raise ApiError(409, f"{name!r} is the server's own device; agents register other names")
    row = session.get(Device, name)
    if row is None:
        row = Device(name=name)
        session.add(row)
        response.status_code = 201
    row.backend, row.fingerprint, row.has_tensorrt = body.backend, body.fingerprint, body.has_tensorrt
    row.executor, row.queue, row.last_seen_at = body.executor, f"device.{name}", now()
    session.commit()
    log.info("device %s registered by %s", name, caller.user_name)
    return device_out(row)
