"""OpenAPI 3 description of the VMA progress API, served at /api/v1/openapi.json."""

from vma_agent.progress_store import MAX_BODY_BYTES, MAX_SEQ, STAGES, STATUSES, SYNC_TYPES

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_ID_PARAM = {
    "name": "id", "in": "path", "required": True,
    "description": "A job id (job-YYYYMMDD-HHMMSS.mmm-xxxxxx) or an export name migration-vol-{uuid}; "
                   "both resolve to the job's record once an update named the pair.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
}
_COUNT = {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}
_UPDATE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["stage", "status", "seq"],
    "description": f"At most {MAX_BODY_BYTES} bytes. bytes_transferred needs total_bytes and must not exceed it.",
    "properties": {
        "stage": {"type": "string", "enum": list(STAGES)},
        "status": {"type": "string", "enum": list(STATUSES)},
        "seq": {**_COUNT, "description": "Per-disk sequence number; an update with a seq not above the stored "
                                         "one is ignored, so late or replayed updates never move progress back."},
        "bytes_transferred": _COUNT,
        "total_bytes": {**_COUNT, "description": "Data to copy (allocated or changed bytes), not capacity."},
        "percent": {"type": "number", "minimum": 0, "maximum": 100},
        "throughput_bps": _COUNT,
        "eta_seconds": _COUNT,
        "disk_id": {"type": "string", "maxLength": 128, "description": "Absent for job-level stage updates."},
        "sync_type": {"type": "string", "enum": list(SYNC_TYPES)},
        "error_message": {"type": "string", "maxLength": 4000},
        "job_id": {"type": "string", "maxLength": 128,
                   "description": "Links an update posted by export name to its job's record."},
        "export_name": {"type": "string", "pattern": "^migration-vol-[0-9a-f-]{36}$",
                        "description": "Makes the disk's export name resolve to the job's record."},
    },
}
_AGGREGATE = {
    "type": "object",
    "properties": {
        "stage": {"type": "string"}, "status": {"type": "string"},
        "bytes_transferred": {"type": "integer"}, "total_bytes": {"type": "integer"},
        "percent": {"type": "number"}, "throughput_bps": {"type": "integer"},
        "eta_seconds": {"type": "integer", "nullable": True}, "disk_count": {"type": "integer"},
        "updated_at": {"type": "number", "description": "Unix time of the newest update"},
    },
}
_RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "job_id": {"type": "string", "nullable": True},
        "job": {"type": "object", "nullable": True, "description": "The latest job-level stage update"},
        "disks": {"type": "object", "additionalProperties": {"type": "object"},
                  "description": "Each disk's latest update, by disk_id"},
        "aggregate": _AGGREGATE,
    },
}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_AUTH_ERRORS = {
    "401": _json(_ERROR, "Missing or wrong bearer token"),
    "503": _json(_ERROR, "No VMA_TOKEN configured on the agent, or its store is unavailable"),
}

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "VMA progress API", "version": "1.0.0",
             "description": "Live replication progress, written by the agent's copy loop and read by the OMA "
                            "poller."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {"ProgressUpdate": _UPDATE, "ProgressRecord": _RECORD, "Error": _ERROR},
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/progress/{id}/update": {
            "post": {
                "summary": "Store a progress update",
                "parameters": [_ID_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ProgressUpdate"}}}},
                "responses": {
                    "200": _json({"type": "object", "properties": {
                        "id": {"type": "string"}, "applied": {"type": "boolean"},
                        "reason": {"type": "string", "nullable": True}}},
                        "Accepted; applied is false for a stale or replayed update"),
                    "400": _json(_ERROR, "Invalid body or id; nothing stored"),
                    "413": _json(_ERROR, f"Body larger than {MAX_BODY_BYTES} bytes; nothing stored"),
                    **_AUTH_ERRORS,
                },
            },
        },
        "/api/v1/progress/{id}": {
            "get": {
                "summary": "The job's record: each disk's latest update and the aggregate",
                "parameters": [_ID_PARAM],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/ProgressRecord"}, "The record"),
                    "404": _json(_ERROR, "No record for this id (yet, or any more)"),
                    **_AUTH_ERRORS,
                },
            },
        },
    },
}
