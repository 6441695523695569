"""FastAPI dependencies: the Services container, the caller, the ready model."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from proxy.auth import OPEN_ACCESS, Principal, require_admin
from proxy.generation import GenerationService
from proxy.runtime import Runtime
from proxy.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_principal(request: Request, services: ServicesDep) -> Principal:
    """The caller; every caller is the admin of tenant ``default`` when no keys are configured."""
    if services.keys is None:
        return OPEN_ACCESS
    return services.keys.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_admin(principal: PrincipalDep) -> Principal:
    return require_admin(principal)


AdminDep = Annotated[Principal, Depends(get_admin)]


def get_runtime(services: ServicesDep) -> Runtime:
    return services.ready()[0]


def get_generation(services: ServicesDep) -> GenerationService:
    return services.ready()[1]


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
GenerationDep = Annotated[GenerationService, Depends(get_generation)]
