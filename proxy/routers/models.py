"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter

from proxy.deps import PrincipalDep, ServicesDep
from proxy.errors import ModelNotFound
from proxy.responses import ModelCard, ModelList

router = APIRouter()


def _card(services: ServicesDep, name: str) -> ModelCard:
    return ModelCard(id=name, created=int(services.started_at))


@router.get("/v1/models")
async def list_models(_: PrincipalDep, services: ServicesDep) -> ModelList:
    """The served model under each of its names (``--served-model-name`` aliases)."""
    return ModelList(data=[_card(services, name) for name in services.settings.served_model_names])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, _: PrincipalDep, services: ServicesDep) -> ModelCard:
    if model_id not in services.settings.served_model_names:
        raise ModelNotFound(f"The model '{model_id[:200]}' does not exist on this server.", param="model")
    return _card(services, model_id)
