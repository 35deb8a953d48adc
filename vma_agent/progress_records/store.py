"""The VMA's progress records in Redis. Free of Django so the agent's store
runs and tests on its own.

One record per job, a Redis hash: one field per disk (its latest update), a
field for job-level stage updates and a few `_`-prefixed fields of its
history (first and last update, each stage's first update, the sync type,
the peak throughput). A job id and every export name that reported for the
job resolve to that record, so a reader never has to know which of the two
ids a writer used (MigrateKit OSSEA's id-mismatch bug).

Every applied update also bumps a counter and files the record under it in
a sorted set: the change feed, which lets a reader ask for the records that
changed since its last read instead of reading every record."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

import redis

from vma_agent.progress_records.schema import (
    INHERITED,
    JOB_FIELD,
    TOKEN_ONLY,
    InvalidUpdate,
    is_export_name,
    validate_id,
)
from vma_agent.progress_records.view import build_record

# Our reporter's seqs are the agent's clock in microseconds; one further ahead
# than this would hold back every later update until the clock caught up.
SEQ_AHEAD_US = 60 * 1_000_000

# Compare-and-set per disk in one round trip, so two writers for one job never
# lose each other's disks and a late or replayed update never replaces a newer
# one; a disk that reported completion keeps that final state.
#
# An update with a seq applies only above the stored seq. One without (the
# MigrateKit OSSEA's migratekit) gets the stored seq + 1, or, for a disk's first entry,
# the agent's clock in microseconds (what our reporter's seqs are made of, so
# a record lost and written again never restarts below what a reader saw).
# Either way the stored seq only grows, however the two kinds mix.
#
# The entry is written as the JSON the caller built plus its seq, spliced in
# as text: cjson would print numbers with 14 significant digits.
#
# A disk entry our own copy wrote (it carries its attempt) takes no token-less
# update: a local process could otherwise pose as the copy's heartbeat or
# mark it completed, which would lock the copy's own updates out. A newer
# attempt of the copy applies whatever seq an older run left stored.
#
# KEYS: record, rates, feed counter, feed set, epoch, alias...
# ARGV: field, seq or '', entry JSON without seq, ttl, record id, now (s),
#       now (us), stage, status, throughput_bps, sync_type or '',
#       inherited names (comma-separated), new epoch, '1' if sent with the
#       token, bytes_transferred or '', attempt or ''
# Returns {applied, stored seq, why not ('' , 'owned' or 'bytes')}.
_APPLY = """
local record, field = KEYS[1], ARGV[1]
local current = redis.call('HGET', record, field)
local trusted = ARGV[14] == '1'
local seq
local extra = ''
if current then
  local stored = cjson.decode(current)
  local stored_seq = tonumber(stored['seq']) or 0
  if not trusted and field ~= '_job' and stored['attempt'] ~= nil then return {0, stored_seq, 'owned'} end
  if stored['status'] == 'completed' and field ~= '_job' and not (trusted and stored['loopback']) then
    return {0, stored_seq, ''}
  end
  local newer_attempt = ARGV[16] ~= '' and tonumber(ARGV[16]) > (tonumber(stored['attempt']) or 0)
  if ARGV[2] ~= '' then
    seq = tonumber(ARGV[2])
    if stored_seq >= seq and not newer_attempt then return {0, stored_seq, ''} end
  else
    seq = stored_seq + 1
  end
  for name in string.gmatch(ARGV[12], '[^,]+') do
    local value = stored[name]
    if type(value) == 'number' then
      extra = extra .. ',"' .. name .. '":' .. string.format('%d', value)
    elseif type(value) == 'string' then
      extra = extra .. ',"' .. name .. '":' .. cjson.encode(value)
    end
  end
  local total = tonumber(stored['total_bytes'])
  if ARGV[15] ~= '' and string.find(ARGV[12], 'total_bytes', 1, true) and total and total > 0
      and tonumber(ARGV[15]) > total then
    return {0, stored_seq, 'bytes'}
  end
elseif ARGV[2] ~= '' then
  seq = tonumber(ARGV[2])
else
  seq = tonumber(ARGV[7])
end
local ttl = tonumber(ARGV[4])
redis.call('HSET', record, field, string.sub(ARGV[3], 1, -2) .. extra .. ',"seq":' .. string.format('%d', seq) .. '}')
redis.call('HSETNX', record, '_first', ARGV[6])
redis.call('HSET', record, '_last', ARGV[6])
redis.call('HSETNX', record, '_ps:' .. ARGV[8], ARGV[6])
if ARGV[11] ~= '' then redis.call('HSET', record, '_sync', ARGV[11]) end
if field ~= '_job' then
  local rate = '0'
  if ARGV[9] == 'in_progress' then rate = ARGV[10] end
  redis.call('HSET', KEYS[2], field, rate)
  redis.call('EXPIRE', KEYS[2], ttl)
  local sum = 0
  for _, value in ipairs(redis.call('HVALS', KEYS[2])) do sum = sum + (tonumber(value) or 0) end
  if sum > (tonumber(redis.call('HGET', record, '_peak')) or 0) then
    redis.call('HSET', record, '_peak', string.format('%d', sum))
  end
end
redis.call('EXPIRE', record, ttl)
for i = 6, #KEYS do
  redis.call('SET', KEYS[i], ARGV[5], 'EX', ttl)
end
redis.call('SETNX', KEYS[5], ARGV[13])
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[3]), ARGV[5])
return {1, seq, ''}
"""

# The change feed's read, atomic: the counter, the records filed above
# `since` (at most `limit`, oldest change first) with their fields, and the
# members whose record expired. Members are ordered by their last change and
# every record lives `ttl` after it, so expired ones are always at the bottom.
#
# KEYS: feed counter, feed set, epoch
# ARGV: since, limit, record key prefix, new epoch, trim limit
_CHANGES = """
redis.call('SETNX', KEYS[3], ARGV[4])
local epoch = redis.call('GET', KEYS[3])
local counter = redis.call('GET', KEYS[1]) or '0'
local expired = {}
while #expired < tonumber(ARGV[5]) do
  local lowest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #lowest == 0 or redis.call('EXISTS', ARGV[3] .. lowest[1]) == 1 then break end
  redis.call('ZREM', KEYS[2], lowest[1])
  table.insert(expired, lowest[1])
end
local limit = tonumber(ARGV[2])
local rows = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, limit)
local records = {}
local last = ARGV[1]
for i = 1, #rows, 2 do
  last = rows[i + 1]
  local fields = redis.call('HGETALL', ARGV[3] .. rows[i])
  if #fields == 0 then
    redis.call('ZREM', KEYS[2], rows[i])
    table.insert(expired, rows[i])
  else
    table.insert(records, {rows[i], fields})
  end
end
local more = 0
local cursor = counter
if #rows / 2 >= limit then
  more = 1
  cursor = last
end
return {epoch, cursor, more, expired, records}
"""

FEED_LIMIT = 2000  # records per batch read unless the reader asks otherwise
FEED_MAX_LIMIT = 10000
TRIM_PER_READ = 1000


@dataclass
class ApplyResult:
    record_id: str
    applied: bool
    seq: int = 0
    refused: str = ""  # why not, when it is not a late or replayed update: owned, bytes


@dataclass
class Changes:
    """One page of the change feed."""

    epoch: str
    cursor: int
    more: bool
    records: list[dict]
    expired: list[str]

    def as_json(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "more": self.more, "records": self.records,
                "expired": self.expired}


class ProgressStore:
    """Progress records in Redis under `prefix`, each kept `ttl_s` after its
    last update (long after completion, for late readers). Not for Redis
    Cluster: the feed's scripts touch records they learn as they run."""

    def __init__(self, client: redis.Redis, prefix: str = "vma:progress", ttl_s: int = 7 * 24 * 3600):
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._apply = client.register_script(_APPLY)
        self._changes = client.register_script(_CHANGES)

    @classmethod
    def from_url(cls, url: str, **kwargs) -> ProgressStore:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5), **kwargs)

    def _record_key(self, record_id: str) -> str:
        return f"{self.prefix}:record:{record_id}"

    def _rates_key(self, record_id: str) -> str:
        return f"{self.prefix}:rates:{record_id}"

    def _alias_key(self, export_name: str) -> str:
        return f"{self.prefix}:alias:{export_name}"

    def _feed_keys(self) -> list[str]:
        return [f"{self.prefix}:feed:counter", f"{self.prefix}:feed:changes", f"{self.prefix}:feed:epoch"]

    def ping(self) -> bool:
        return bool(self.client.ping())

    def resolve(self, record_id: str) -> str:
        """The record an id names: an export name that reported for a job
        resolves to the job's record."""
        if is_export_name(record_id):
            job_id = self.client.get(self._alias_key(record_id))
            if job_id:
                return job_id.decode()
        return record_id

    def apply(self, record_id: str, update: dict, *, trusted: bool = True) -> ApplyResult:
        """Store a validated update posted to `record_id` (job id or export
        name). trusted: it came with the bearer token; a token-less one may
        carry display fields only (TOKEN_ONLY are refused) and never changes
        an entry our own copy wrote."""
        validate_id(record_id)
        if not trusted and (sent := [name for name in TOKEN_ONLY if name in update]):
            raise InvalidUpdate(f"{', '.join(sent)} need the bearer token: a token-less update may only "
                                f"change what is displayed", status=403)
        now_ns = time.time_ns()
        seq = update.get("seq")
        if seq is not None and seq > now_ns // 1000 + SEQ_AHEAD_US:
            raise InvalidUpdate(f"seq {seq} is more than {SEQ_AHEAD_US // 1_000_000} s ahead of this agent's "
                                f"clock in microseconds ({now_ns // 1000}); it would hold back every later update")
        job_id = update.get("job_id")
        if job_id is None and not is_export_name(record_id):
            job_id = record_id
        if job_id is None:
            job_id = self.resolve(record_id)  # an export name already linked to a job, or itself
        exports = {name for name in (update.get("export_name"), update.get("disk_id"), record_id)
                   if name and is_export_name(name) and name != job_id}
        field = update.get("disk_id") or update.get("export_name")
        if field is None and is_export_name(record_id) and record_id != job_id:
            field = record_id
        stored = {key: value for key, value in update.items() if key != "seq"}
        stored["received_at"] = now_ns / 1e9
        if not trusted:
            stored["loopback"] = True  # the OMA poller takes no heartbeat or progress of its copies from it
        stored.setdefault("job_id", None if is_export_name(job_id) else job_id)
        inherited = [name for name in INHERITED if name not in stored]
        counter, changes, epoch = self._feed_keys()
        keys = [self._record_key(job_id), self._rates_key(job_id), counter, changes, epoch]
        keys += [self._alias_key(name) for name in sorted(exports)]
        applied, stored_seq, refused = self._apply(keys=keys, args=[
            field or JOB_FIELD, "" if seq is None else seq, json.dumps(stored), self.ttl_s, job_id,
            f"{now_ns / 1e9:.6f}", now_ns // 1000, update["stage"], update["status"],
            update.get("throughput_bps") or 0, update.get("sync_type") or "", ",".join(inherited),
            secrets.token_hex(8), "1" if trusted else "", update.get("bytes_transferred", ""),
            update.get("attempt", "")])
        return ApplyResult(job_id, bool(applied), int(stored_seq), refused.decode() if refused else "")

    def get(self, record_id: str, now: float | None = None) -> dict | None:
        """The record: MigrateKit OSSEA's VMAProgressResponse keys at the top level,
        beside each disk's latest update and the aggregate; None when none."""
        job_id = self.resolve(record_id)
        raw = self.client.hgetall(self._record_key(job_id))
        if not raw:
            return None
        return build_record(job_id, {key.decode(): value.decode() for key, value in raw.items()}, now)

    def changes(self, since: int = 0, limit: int = FEED_LIMIT, now: float | None = None) -> Changes:
        """The records changed after cursor `since` (0: every live record),
        oldest change first, and the cursor to ask from next time. A record
        changed twice comes once; one changed after this read comes next
        time. `expired` lists records gone since (their TTL ran out)."""
        epoch, cursor, more, expired, rows = self._changes(
            keys=self._feed_keys(), args=[since, limit, f"{self.prefix}:record:", secrets.token_hex(8),
                                          TRIM_PER_READ])
        records = []
        for record_id, flat in rows:
            fields = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
            records.append(build_record(record_id.decode(), fields, now))
        return Changes(epoch.decode(), int(cursor), bool(more), records, [name.decode() for name in expired])

    def count_keys(self) -> int:
        return sum(1 for _ in self.client.scan_iter(f"{self.prefix}:*", count=1000))
