"""OpenAPI 3 description of the VMA progress API, served at /api/v1/openapi.json."""

from vma_agent.contract import STAGES
from vma_agent.progress_records.schema import (
    EXPORT_RE,
    ID_RE,
    MAX_BODY_BYTES,
    MAX_DISK_BYTES,
    MAX_ETA_S,
    MAX_SEQ,
    MAX_THROUGHPUT_BPS,
    STATUSES,
    SYNC_TYPES,
)
from vma_agent.progress_records.store import FEED_LIMIT, FEED_MAX_LIMIT, SEQ_AHEAD_US

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_ID_PARAM = {
    "name": "id", "in": "path", "required": True,
    "description": "A job id (job-YYYYMMDD-HHMMSS.mmm-xxxxxx) or an export name migration-vol-{uuid}; "
                   "both resolve to the job's record once an update named the pair.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
}
_COUNT = {"type": "integer", "format": "int64", "minimum": 0, "maximum": MAX_SEQ}
_BYTES = {**_COUNT, "maximum": MAX_DISK_BYTES}
_INT64 = {"type": "integer", "format": "int64"}
_FLOAT = {"type": "number", "format": "double"}
_STRING = {"type": "string"}
_TIME = {"type": "string", "description": "RFC 3339 UTC time; \"\" when not known"}

# MigrateKit OSSEA's migratekit VMAProgressUpdate, exactly as Go marshals it.
_MIGRATEKIT_UPDATE_PROPERTIES = {
    "stage": {"type": "string", "enum": list(STAGES)},
    "status": {"type": "string", "enum": list(STATUSES),
               "description": "Left out: completed, failed or cancelled for the stages of those names, "
                              "in_progress otherwise."},
    "bytes_transferred": {**_BYTES, "description": "Not above total_bytes (the update's, or the disk's stored one)"},
    "total_bytes": {**_BYTES, "description": "Data to copy (allocated or changed bytes), not capacity. Left "
                                             "out: the disk's stored total stays."},
    "throughput_bps": {**_COUNT, "maximum": MAX_THROUGHPUT_BPS, "description": "Bytes per second"},
    "percent": {"type": "number", "minimum": 0, "maximum": 100},
    "disk_id": {"type": "string", "maxLength": 128, "pattern": ID_RE.pattern,
                "description": "The disk, e.g. disk-2000 or its export name. Left out: a job-level update."},
    "sync_type": {"type": "string", "enum": list(SYNC_TYPES),
                  "description": "Left out: the record's known sync type stays."},
    "error_message": {"type": "string", "maxLength": 4000},
}
_MIGRATEKIT_UPDATE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["stage"],
    "description": "MigrateKit OSSEA's migratekit VMAProgressUpdate: no seq. Updates of one disk apply in "
                   "arrival order: each gets the stored seq + 1 (a disk's first gets the agent's clock in "
                   f"microseconds). At most {MAX_BODY_BYTES} bytes. Sent without a token (VMA_TRUST_LOOPBACK), "
                   "only these fields are accepted, and never for a disk this agent's own copy reports.",
    "properties": _MIGRATEKIT_UPDATE_PROPERTIES,
}
_UPDATE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["stage", "seq"],
    "description": f"Our agent's update: migratekit's fields plus a seq and optional detail. At most "
                   f"{MAX_BODY_BYTES} bytes. bytes_transferred must not exceed total_bytes when both are given.",
    "properties": {
        **_MIGRATEKIT_UPDATE_PROPERTIES,
        "seq": {**_COUNT, "description": "Per-disk sequence number; an update with a seq not above the stored "
                                         "one is ignored, so late or replayed updates never move progress back, "
                                         "unless it comes from a newer attempt. Mixed with updates without seq, "
                                         "the stored seq only grows. Our reporter's are the clock in microseconds: "
                                         f"one more than {SEQ_AHEAD_US // 1_000_000} s ahead of the agent's clock "
                                         "is refused (400). Needs the token."},
        "eta_seconds": {**_COUNT, "maximum": MAX_ETA_S},
        "job_id": {"type": "string", "maxLength": 128, "pattern": ID_RE.pattern,
                   "description": "Links an update posted by export name to its job's record."},
        "export_name": {"type": "string", "pattern": EXPORT_RE.pattern,
                        "description": "Makes the disk's export name resolve to the job's record."},
        "checkpoint_bytes": {**_BYTES, "description": "The copy's committed resume cursor, shown only: a copy "
                                                  "resumes from the cursor it recorded itself on the agent. "
                                                  "Needs the token."},
        "attempt": {**_COUNT, "minimum": 1, "description": "The copy run number. Needs the token."},
        "worker": {"type": "string", "maxLength": 200, "description": "host:pid of the copy. Needs the token."},
    },
}
_APPLY_RESULT = {
    "type": "object", "required": ["id", "applied", "seq", "reason"],
    "properties": {"id": {"type": "string", "description": "The record (job id) the update went to"},
                   "applied": {"type": "boolean"},
                   "seq": {**_COUNT, "description": "The entry's stored seq after this update"},
                   "reason": {"type": "string", "nullable": True}},
}
_AGGREGATE = {
    "type": "object",
    "properties": {
        "stage": _STRING, "status": _STRING,
        "bytes_transferred": _INT64, "total_bytes": _INT64,
        "percent": _FLOAT, "throughput_bps": _INT64,
        "eta_seconds": {**_INT64, "nullable": True}, "disk_count": _INT64,
        "updated_at": {"type": "number", "description": "Unix time of the newest update"},
    },
}
_DISK_ENTRY = {
    "type": "object",
    "description": "A disk's latest update as stored: the fields it was sent with (total_bytes, sync_type and "
                   "export_name kept from earlier updates when left out), seq and received_at (Unix time).",
    "required": ["stage", "status", "seq", "received_at"],
    "properties": {**_UPDATE["properties"], "received_at": {"type": "number"},
                   "job_id": {**_UPDATE["properties"]["job_id"], "nullable": True,
                              "description": "null for an entry kept under an export name alone"},
                   "loopback": {"type": "boolean", "description": "Sent without a token (VMA_TRUST_LOOPBACK): "
                                                                 "display only, never read as our copy's"}},
}


def _object(properties: dict) -> dict:
    return {"type": "object", "required": list(properties), "properties": properties}


# MigrateKit OSSEA's VMAProgressResponse, as its OMA decodes it: every key present, Go's types.
_OSSEA_RESPONSE = {
    "job_id": {**_STRING, "description": "\"\" for a record kept under an export name alone"},
    "status": {"type": "string", "enum": list(STATUSES)},
    "sync_type": {**_STRING, "description": "full, incremental, or \"\" when no update named it"},
    "phase": {**_STRING, "description": "The stage the job is in: its slowest unfinished disk's"},
    "percentage": {**_FLOAT, "description": "Job-level: Initializing 5, Creating Snapshot 10, Setting up NBD 20, "
                                            "Preparing Migration 30, Transfer 30..100 over data to copy"},
    "current_operation": _STRING,
    "bytes_transferred": _INT64,
    "total_bytes": _INT64,
    "throughput": _object({"current_mbps": {**_FLOAT, "description": "10^6 bytes per second"},
                           "average_mbps": {**_FLOAT, "description": "Since the Transfer stage began"},
                           "peak_mbps": _FLOAT, "last_update": _TIME}),
    "timing": _object({"start_time": _TIME, "last_update": _TIME, "elapsed_ms": _INT64,
                       "eta_seconds": {"type": "integer"}, "phase_start": _TIME, "phase_elapsed_ms": _INT64}),
    "vm_info": _object({"name": _STRING, "path": _STRING, "disk_size_gb": _INT64, "disk_size_bytes": _INT64,
                        "cbt_enabled": {"type": "boolean",
                                        "description": "true for an incremental sync (changed blocks)"}}),
    "phases": {"type": "array", "items": _object({"name": _STRING, "status": _STRING, "start_time": _TIME,
                                                  "end_time": _TIME, "duration_ms": _INT64})},
    "errors": {"type": "array", "items": {"type": "string"}},
    "last_error": {"type": "string", "nullable": True},
}
_RECORD = {
    "type": "object",
    "required": [*_OSSEA_RESPONSE, "id", "job", "disks", "aggregate"],
    "description": "MigrateKit OSSEA's VMAProgressResponse at the top level, and this agent's per-disk detail "
                   "beside it.",
    "properties": {
        **_OSSEA_RESPONSE,
        "id": {**_STRING, "description": "The record's id: the job id, or an export name"},
        "job": {"type": "object", "nullable": True, "description": "The latest job-level stage update"},
        "disks": {"type": "object", "additionalProperties": _DISK_ENTRY,
                  "description": "Each disk's latest update, by disk_id"},
        "aggregate": _AGGREGATE,
    },
}
_STATUS = _object({key: _OSSEA_RESPONSE[key] for key in (
    "job_id", "status", "sync_type", "phase", "percentage", "current_operation", "bytes_transferred",
    "total_bytes")} | {"id": _STRING, "last_update": _TIME})
_CHANGES = _object({
    "epoch": {**_STRING, "description": "The store's identity; a new epoch means the store was emptied: read "
                                        "again from since=0"},
    "cursor": {**_COUNT, "description": "Pass it as `since` next time"},
    "more": {"type": "boolean", "description": "The page was full (limit): ask again from cursor now"},
    "records": {"type": "array", "items": {"$ref": "#/components/schemas/ProgressRecord"},
                "description": "Each record changed after `since` once, in its latest state, oldest change "
                               "first"},
    "expired": {"type": "array", "items": _STRING,
                "description": "Records whose time to live ran out since the last read of the feed"},
    "agent": {**_object({"name": {**_STRING, "description": "The agent's name (its queue: vma.<name>)"},
                         "version": {**_STRING, "description": "The agent software's version"}}),
              "description": "Who answered: the OMA records it as the agent's health"},
})
_LIMIT = {"type": "integer", "nullable": True, "minimum": 1, "description": "Bytes per second; null: no limit"}
_JOB_LIMIT = _object({
    "job_id": _STRING,
    "bytes_per_s": {**_LIMIT, "description": "The limit the OMA set while the job ran; null: none (or not changed)"},
    "changed": {"type": "boolean", "description": "The OMA changed the limit while the job ran; if not, each copy "
                                                  "keeps its order's limit"},
    "applied": {"type": "object", "additionalProperties": {"type": "integer", "nullable": True},
                "description": "Per disk, the limit its copy last applied (null: none)"},
})
_HEALTH = _object({"status": {"type": "string", "enum": ["ok", "unavailable"]}, "store": _STRING})


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "401": _json(_ERROR, "Missing or wrong bearer token (token-less: allowed only where VMA_TRUST_LOOPBACK "
                         "lets a request straight from loopback; any wrong token)"),
    "405": _json(_ERROR, "Wrong method; Allow lists the right one"),
    "503": _json(_ERROR, "No VMA_TOKEN configured on the agent (for a request that needs one), or its store "
                         "is unavailable"),
}
_WRITE_ERRORS = {
    "403": _json(_ERROR, "A request from a page of another site (an Origin header other than this host, or "
                         "Sec-Fetch-Site cross-site); for an update sent without a token: a field that needs "
                         "the token, or a disk this agent's own copy reports"),
    "415": _json(_ERROR, "The body is not declared application/json"),
}
_BAD_ID = {"400": _json(_ERROR, "Invalid id")}
_NOT_FOUND = {"404": _json(_ERROR, "No record for this id (yet, or any more); not an error by itself")}

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "VMA progress API", "version": "1.2.0",
             "description": "Live replication progress, written by the agent's copy loop (and MigrateKit "
                            "OSSEA's migratekit) and read by the OMA poller (and MigrateKit OSSEA's OMA). "
                            "Requests need the bearer token. Only while the agent trusts loopback "
                            "(VMA_TRUST_LOOPBACK, off by default), a request without an Authorization header "
                            "that arrives straight from loopback (no X-Forwarded-For, Forwarded or X-Real-IP) "
                            "may post an update's display fields (MigratekitProgressUpdate) and read a record or "
                            "status by id; control (stop, limit) and the change feed always need the token. "
                            "Every POST needs Content-Type application/json and is refused from a page of "
                            "another site."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {"ProgressUpdate": _UPDATE, "MigratekitProgressUpdate": _MIGRATEKIT_UPDATE,
                    "ProgressRecord": _RECORD, "JobStatus": _STATUS, "Changes": _CHANGES, "Health": _HEALTH,
                    "JobLimit": _JOB_LIMIT, "Error": _ERROR},
    },
    "security": [{"bearer": []}, {}],
    "paths": {
        "/api/v1/progress/{id}/update": {
            "post": {
                "summary": "Store a progress update (ours, with seq, or migratekit's without)",
                "parameters": [_ID_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                    {"$ref": "#/components/schemas/ProgressUpdate"},
                    {"$ref": "#/components/schemas/MigratekitProgressUpdate"}]}}}},
                "responses": {
                    "200": _json(_APPLY_RESULT, "Accepted; applied is false for a stale or replayed update, or "
                                                "one for a disk that already completed"),
                    "400": _json(_ERROR, "Invalid body or id, a seq too far ahead of the agent's clock, or "
                                         "bytes_transferred above the disk's stored total; nothing stored"),
                    "413": _json(_ERROR, f"Body larger than {MAX_BODY_BYTES} bytes; nothing stored"),
                    **_ERRORS, **_WRITE_ERRORS,
                },
            },
        },
        "/api/v1/progress/{id}": {
            "get": {
                "summary": "The job's record: MigrateKit OSSEA's VMAProgressResponse, each disk's latest update and "
                           "the aggregate",
                "parameters": [_ID_PARAM],
                "responses": {"200": _json({"$ref": "#/components/schemas/ProgressRecord"}, "The record"),
                              **_BAD_ID, **_NOT_FOUND, **_ERRORS},
            },
        },
        "/api/v1/progress": {
            "get": {
                "summary": "The change feed: every record changed after a cursor (the OMA poller's one read "
                           "per pass). Always needs the token: it lists every job id",
                "parameters": [
                    {"name": "since", "in": "query", "required": False,
                     "description": "The cursor of the previous read; 0 or absent: every live record",
                     "schema": {**_COUNT, "default": 0}},
                    {"name": "limit", "in": "query", "required": False, "description": "Records per page",
                     "schema": {"type": "integer", "minimum": 1, "maximum": FEED_MAX_LIMIT,
                                "default": FEED_LIMIT}},
                ],
                "responses": {"200": _json({"$ref": "#/components/schemas/Changes"}, "The changed records"),
                              "400": _json(_ERROR, "since or limit not an integer in range"), **_ERRORS},
            },
        },
        "/api/v1/status/{id}": {
            "get": {
                "summary": "The job's status in a few keys",
                "parameters": [_ID_PARAM],
                "responses": {"200": _json({"$ref": "#/components/schemas/JobStatus"}, "The job's status"),
                              **_BAD_ID, **_NOT_FOUND, **_ERRORS},
            },
        },
        "/api/v1/jobs/{id}/stop": {
            "post": {
                "summary": "The OMA asks this agent to stop a job's copies (the job was cancelled or failed): "
                           "each stops within a heartbeat interval and reports \"cancelled\". Always needs the token",
                "parameters": [_ID_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["reason"], "additionalProperties": True,
                    "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 500}}}}}},
                "responses": {"200": _json(_object({"job_id": {"type": "string"}, "stopping": {"type": "boolean"}}),
                                           "The job's copies on this agent will stop"),
                              "400": _json(_ERROR, "Invalid id or body (a non-empty reason is required)"),
                              **_ERRORS, **_WRITE_ERRORS},
            },
        },
        "/api/v1/jobs/{id}/limit": {
            "get": {
                "summary": "The job's bandwidth limit per disk copy, and the limit each running copy last "
                           "applied. Always needs the token",
                "parameters": [_ID_PARAM],
                "responses": {"200": _json({"$ref": "#/components/schemas/JobLimit"}, "The job's limit"),
                              **_BAD_ID, **_ERRORS},
            },
            "post": {
                "summary": "The OMA changes a job's bandwidth limit per disk copy; the job's running copies "
                           "follow within a second or two. Always needs the token",
                "parameters": [_ID_PARAM],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["bytes_per_s"], "additionalProperties": True,
                    "properties": {"bytes_per_s": _LIMIT}}}}},
                "responses": {"200": _json({"$ref": "#/components/schemas/JobLimit"}, "The limit is changed"),
                              "400": _json(_ERROR, "Invalid id or body (bytes_per_s: a positive integer or null)"),
                              **_ERRORS, **_WRITE_ERRORS},
            },
        },
        "/api/v1/health": {
            "get": {
                "summary": "Whether the agent API and its store answer (no token needed)",
                "security": [{}],
                "responses": {"200": _json({"$ref": "#/components/schemas/Health"}, "Alive"),
                              "405": _ERRORS["405"],
                              "503": _json({"$ref": "#/components/schemas/Health"}, "The store does not answer")},
            },
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [{}],
                "responses": {"200": {"description": "OpenAPI 3 document",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              "405": _ERRORS["405"]},
            },
        },
    },
}
