"""``/api/v1/admin/api-keys``: make, list and revoke API keys (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status

from conveyor.api.auth import Authenticator, Scope, new_key
from conveyor.api.deps import ServicesDep, require
from conveyor.api.errors import ApiProblem
from conveyor.api.routes import problems
from conveyor.api.schemas import INT64_MAX, ApiKeyCreate, ApiKeyCreated, ApiKeyOut, ApiKeysOut
from conveyor.db.api_key_store import ApiKeyRecord

router = APIRouter(prefix="/admin/api-keys", tags=["admin"], dependencies=[require(Scope.ADMIN)])

KeyIdPath = Annotated[int, Path(ge=1, le=INT64_MAX, description="The key's id.")]


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_api_key(body: ApiKeyCreate, services: ServicesDep) -> ApiKeyCreated:
    """Make an API key. The key is in this response only: it is stored as a hash and cannot be shown
    again."""
    made = new_key()
    record = await services.keys.create(
        name=body.name, prefix=made.prefix, key_hash=made.key_hash, scopes=[s.value for s in body.scopes]
    )
    return ApiKeyCreated(**_key_out(record).model_dump(), key=made.key)


@router.get("")
async def list_api_keys(services: ServicesDep) -> ApiKeysOut:
    """Every key, revoked ones included (for the record); never the keys themselves."""
    return ApiKeysOut(items=[_key_out(record) for record in await services.keys.list()])


@router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=problems(404), response_class=Response)
async def revoke_api_key(key_id: KeyIdPath, request: Request, services: ServicesDep) -> None:
    """Revoke a key: at once in this process, within 2 seconds everywhere. Revoking a revoked key
    changes nothing."""
    record = await services.keys.revoke(key_id)
    if record is None:
        raise ApiProblem(404, f"no API key with id {key_id}", kind="api-key-not-found")
    authenticator = request.app.state.authenticator
    assert isinstance(authenticator, Authenticator)
    authenticator.forget(key_id)


def _key_out(record: ApiKeyRecord) -> ApiKeyOut:
    return ApiKeyOut(
        id=record.id,
        name=record.name,
        prefix=record.prefix,
        scopes=[Scope(s) for s in record.scopes],
        created_at=record.created_at,
        last_used_at=record.last_used_at,
        revoked_at=record.revoked_at,
        active=record.active,
    )
