"""The Lua scripts behind every multi-key write.

Why Lua and not WATCH/MULTI: a script runs atomically on the server, so the checks (does the
tenant exist? is the version bound? did the blob vanish?) and the writes they guard happen
with nothing in between, in one round trip, without retry storms under contention. Every
script does ALL its checks before its first write (Redis does not roll back a script that
fails half way), returns ``{status, ...}``, and ends with ``INCR changes`` + ``PUBLISH``.
Keys come from :class:`tessera.store.keys.Keys` in Python and arrive as ``KEYS``; no script builds
a key. Where a script needs facts only Python knows (the next version number, a blob's chunk
count), Python reads them optimistically and the script re-checks them and answers
``RETRY`` when they changed -- the compare-and-set half of WATCH/MULTI, done server side.

Replays are harmless: redis-py retries a command whose connection failed, so a script may
run twice with the same arguments when its first reply was lost. Writes that create or
change a record carry a per-call ``token`` stored with the record; a script that finds its
own token answers OK without writing again (no second version, no double revision bump,
no CAS conflict against itself).

``#!lua`` (no ``allow-oom`` flag) makes Redis refuse a whole script up front when it is over
``maxmemory``: an upload is stored completely or not at all.

Blob sections (see :mod:`tessera.store.blobs`) sit at the END of ``KEYS`` and at the START of
``ARGV``. Acquire section: ``KEYS`` = meta, then (when staged) n staging keys and n chunk
keys; ``ARGV`` = sha256, size, chunk_bytes, staged (0/1), n. Release sections: ``ARGV``
= m, then each section's chunk count (-1: the meta was already missing); ``KEYS`` = for
each, meta and its chunk keys.
"""

from __future__ import annotations

_BLOB = r"""
local function blob_ready(k, a)
  -- true when the blob can be referenced: it exists, or every staged chunk is still there
  if redis.call('EXISTS', KEYS[k]) == 1 then return true end
  if ARGV[a + 3] ~= '1' then return false end
  local n = tonumber(ARGV[a + 4])
  local total = 0
  for i = 1, n do
    if redis.call('EXISTS', KEYS[k + i]) == 0 then return false end
    total = total + redis.call('STRLEN', KEYS[k + i])
  end
  return total == tonumber(ARGV[a + 1])
end

local function blob_discard(k, a)
  -- drop staged chunks that were not needed
  if ARGV[a + 3] ~= '1' then return end
  for i = 1, tonumber(ARGV[a + 4]) do redis.call('DEL', KEYS[k + i]) end
end

local function blob_acquire(k, a)
  -- one more reference; a new blob's staged chunks become its chunks (RENAME is O(1))
  if redis.call('EXISTS', KEYS[k]) == 1 then
    redis.call('HINCRBY', KEYS[k], 'refs', 1)
    blob_discard(k, a)
    return
  end
  local n = tonumber(ARGV[a + 4])
  for i = 1, n do
    redis.call('RENAME', KEYS[k + i], KEYS[k + n + i])
    redis.call('PERSIST', KEYS[k + n + i])
  end
  redis.call('HSET', KEYS[k], 'sha256', ARGV[a], 'size', ARGV[a + 1],
             'chunk_bytes', ARGV[a + 2], 'chunks', n, 'refs', 1)
end

local function release_ready(k, a)
  -- every release section still describes its blob (chunk count unchanged)
  local m = tonumber(ARGV[a])
  for s = 1, m do
    local n = tonumber(ARGV[a + s])
    if n < 0 then
      if redis.call('EXISTS', KEYS[k]) == 1 then return false end
      n = 0
    elseif redis.call('HGET', KEYS[k], 'chunks') ~= tostring(n) then
      return false
    end
    k = k + 1 + n
  end
  return true
end

local function release(k, a)
  -- one reference fewer; the blob and its chunks go when nothing references it
  local m = tonumber(ARGV[a])
  for s = 1, m do
    local n = tonumber(ARGV[a + s])
    if n < 0 then
      n = 0
    elseif redis.call('EXISTS', KEYS[k]) == 1 then
      if redis.call('HINCRBY', KEYS[k], 'refs', -1) <= 0 then
        redis.call('DEL', KEYS[k])
        for i = 1, n do redis.call('DEL', KEYS[k + i]) end
      end
    end
    k = k + 1 + n
  end
end
"""


def _script(body: str) -> str:
    return "#!lua\n" + _BLOB + body


# KEYS: tenant, tenants, tenant_api_keys, api_key, changes
# ARGV: tenant, created, key_hash, channel, event, token
CREATE_TENANT = _script(r"""
if redis.call('HGET', KEYS[1], 'token') == ARGV[6] then return {'OK'} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'CONFLICT', 'tenant exists'} end
if redis.call('EXISTS', KEYS[4]) == 1 then return {'RETRY'} end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'created', ARGV[2], 'token', ARGV[6])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SET', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('INCR', KEYS[5])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'OK'}
""")

# KEYS: tenant, tenant_api_keys, api_key, changes
# ARGV: tenant, key_hash, channel, event
ADD_API_KEY = _script(r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND', 'tenant'} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'RETRY'} end
redis.call('SET', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {'OK'}
""")

# KEYS: tenant_api_keys, api_key, changes
# ARGV: tenant, key_hash, channel, event
REVOKE_API_KEY = _script(r"""
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {'NOTFOUND', 'api key'} end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[1], ARGV[2])
redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {'OK'}
""")

# KEYS: tenant, tenants, adapters, hypernets, tasks, tenant_api_keys, task_refs, changes,
#       then na api_key keys, then nt (task, history) pairs
# ARGV: tenant, na, nt, channel, event, then na key hashes, then nt task names
DELETE_TENANT = _script(r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND', 'tenant'} end
if redis.call('SCARD', KEYS[3]) > 0 or redis.call('SCARD', KEYS[4]) > 0 then
  return {'CONFLICT', 'tenant still owns adapters or hypernetworks'}
end
local na, nt = tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('SCARD', KEYS[6]) ~= na or redis.call('SCARD', KEYS[5]) ~= nt then
  return {'RETRY'}
end
for i = 1, na do
  if redis.call('SISMEMBER', KEYS[6], ARGV[5 + i]) == 0 then return {'RETRY'} end
end
for i = 1, nt do
  if redis.call('SISMEMBER', KEYS[5], ARGV[5 + na + i]) == 0 then return {'RETRY'} end
  if redis.call('HEXISTS', KEYS[8 + na + 2 * i - 1], 'adapter') == 1 then
    return {'CONFLICT', 'tenant still has bound tasks'}
  end
end
for i = 9, #KEYS do redis.call('DEL', KEYS[i]) end
for _, k in ipairs({KEYS[1], KEYS[5], KEYS[6], KEYS[7]}) do redis.call('DEL', k) end
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('INCR', KEYS[8])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'OK'}
""")

# New immutable version of an adapter or a hypernetwork.
# KEYS: tenant, seq, versions, version, names, changes, then the acquire section
# ARGV: acquire section (5), version, name, channel, event, token, then field/value pairs
PUT_VERSION = _script(r"""
if redis.call('HGET', KEYS[4], 'token') == ARGV[10] then return {'OK'} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND', 'tenant'} end
local version = tonumber(ARGV[6])
if (tonumber(redis.call('GET', KEYS[2])) or 0) + 1 ~= version then return {'RETRY'} end
if redis.call('EXISTS', KEYS[4]) == 1 then return {'RETRY'} end
if not blob_ready(7, 1) then return {'NEED_DATA'} end
blob_acquire(7, 1)
redis.call('SET', KEYS[2], version)
redis.call('HSET', KEYS[4], 'token', ARGV[10], unpack(ARGV, 11, #ARGV))
redis.call('ZADD', KEYS[3], version, version)
redis.call('SADD', KEYS[5], ARGV[7])
redis.call('INCR', KEYS[6])
redis.call('PUBLISH', ARGV[8], ARGV[9])
return {'OK'}
""")

# KEYS: version, versions, adapters, task_refs, changes, then release sections
# ARGV: release section (1 + m), version, name, ref field, sha256, channel, event
DELETE_ADAPTER_VERSION = _script(r"""
local a = 2 + tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND', 'version'} end
if redis.call('HGET', KEYS[1], 'sha256') ~= ARGV[a + 3] then return {'RETRY'} end
if (tonumber(redis.call('HGET', KEYS[4], ARGV[a + 2])) or 0) > 0 then
  return {'CONFLICT', 'a task is bound to this version'}
end
if not release_ready(6, 1) then return {'RETRY'} end
release(6, 1)
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[a])
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[a + 1]) end
redis.call('INCR', KEYS[5])
redis.call('PUBLISH', ARGV[a + 4], ARGV[a + 5])
return {'OK'}
""")

_HISTORY = r"""
local function record(rev, action, adapter, version, prev)
  local entry = cjson.encode({tenant = ARGV[1], task = ARGV[2], action = action,
    adapter = adapter, version = version, revision = rev, updated = ARGV[4],
    actor = ARGV[3], previous_adapter = prev[2] or '', previous_version = prev[3] or ''})
  redis.call('LPUSH', KEYS[2], entry)
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[6]) - 1)
end
"""

# KEYS: task, history, tasks, task_refs, changes, tenant, version
#       [, hypernetwork tasks: a binding to a HyperLoader task of hypernetwork version]
# ARGV: tenant, task, actor, updated, expected revision or '', history limit, channel,
#       adapter (or hypernetwork), version, ref field, token [, hyper task]
ACTIVATE = _script(_HISTORY + r"""
if redis.call('HGET', KEYS[1], 'token') == ARGV[11] then
  return {'OK', redis.call('HGET', KEYS[1], 'revision')}
end
local hyper = ARGV[12] or ''
if redis.call('EXISTS', KEYS[6]) == 0 then return {'NOTFOUND', 'tenant'} end
if redis.call('EXISTS', KEYS[7]) == 0 then
  if hyper ~= '' then return {'NOTFOUND', 'hypernetwork version'} end
  return {'NOTFOUND', 'adapter version'}
end
if hyper ~= '' and redis.call('HEXISTS', KEYS[8], hyper) == 0 then
  return {'NOTFOUND', 'hypernetwork task ' .. hyper}
end
local cur = redis.call('HMGET', KEYS[1], 'revision', 'adapter', 'version', 'ref')
local rev = tonumber(cur[1]) or 0
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= rev then return {'CONFLICT', tostring(rev)} end
rev = rev + 1
if cur[4] and redis.call('HINCRBY', KEYS[4], cur[4], -1) <= 0 then
  redis.call('HDEL', KEYS[4], cur[4])
end
redis.call('HINCRBY', KEYS[4], ARGV[10], 1)
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'task', ARGV[2], 'adapter', ARGV[8],
           'version', ARGV[9], 'revision', rev, 'updated', ARGV[4], 'actor', ARGV[3],
           'ref', ARGV[10], 'token', ARGV[11])
if hyper ~= '' then redis.call('HSET', KEYS[1], 'hyper_task', hyper)
else redis.call('HDEL', KEYS[1], 'hyper_task') end
record(rev, 'activate', ARGV[8], tonumber(ARGV[9]), cur)
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('INCR', KEYS[5])
redis.call('PUBLISH', ARGV[7], cjson.encode({kind = 'task.activated', tenant = ARGV[1],
  name = ARGV[2], version = tonumber(ARGV[9]), revision = rev, adapter = ARGV[8]}))
return {'OK', rev}
""")

# KEYS: task, history, tasks, task_refs, changes
# ARGV: tenant, task, actor, updated, expected revision or '', history limit, channel, token
DEACTIVATE = _script(_HISTORY + r"""
if redis.call('HGET', KEYS[1], 'token') == ARGV[8] then
  return {'OK', redis.call('HGET', KEYS[1], 'revision')}
end
local cur = redis.call('HMGET', KEYS[1], 'revision', 'adapter', 'version', 'ref')
if not cur[2] then return {'NOTFOUND', 'task is not bound'} end
local rev = tonumber(cur[1]) or 0
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= rev then return {'CONFLICT', tostring(rev)} end
rev = rev + 1
if cur[4] and redis.call('HINCRBY', KEYS[4], cur[4], -1) <= 0 then
  redis.call('HDEL', KEYS[4], cur[4])
end
redis.call('HDEL', KEYS[1], 'adapter', 'version', 'ref', 'hyper_task')
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'task', ARGV[2], 'revision', rev,
           'updated', ARGV[4], 'actor', ARGV[3], 'token', ARGV[8])
record(rev, 'deactivate', '', '', cur)
redis.call('INCR', KEYS[5])
redis.call('PUBLISH', ARGV[7], cjson.encode({kind = 'task.deactivated', tenant = ARGV[1],
  name = ARGV[2], revision = rev}))
return {'OK', rev}
""")

# KEYS: hypernet version, hypernet tasks, changes, then the acquire section
# ARGV: acquire section (5), task, channel, event
REGISTER_TASK = _script(r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND', 'hypernetwork version'} end
local current = redis.call('HGET', KEYS[2], ARGV[6])
if current == ARGV[1] then  -- the same embedding again (or a replay): nothing to do
  blob_discard(4, 1)
  return {'OK'}
end
if current then return {'CONFLICT', 'task already registered with another embedding'} end
if not blob_ready(4, 1) then return {'NEED_DATA'} end
blob_acquire(4, 1)
redis.call('HSET', KEYS[2], ARGV[6], ARGV[1])
redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return {'OK'}
""")

# First writer wins: an existing entry is never replaced.
# KEYS: hypernet tasks, generated, changes, then the acquire section
# ARGV: acquire section (5), task, channel, event, then field/value pairs
PUT_GENERATED = _script(r"""
if redis.call('HEXISTS', KEYS[1], ARGV[6]) == 0 then return {'NOTFOUND', 'task'} end
if redis.call('EXISTS', KEYS[2]) == 1 then
  blob_discard(4, 1)
  return {'EXISTS'}
end
if not blob_ready(4, 1) then return {'NEED_DATA'} end
blob_acquire(4, 1)
redis.call('HSET', KEYS[2], unpack(ARGV, 9, #ARGV))
redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return {'OK'}
""")

# A hypernetwork version with its task embeddings and generated entries.
# KEYS: version, versions, hypernets, hypernet tasks, changes, then nt generated keys,
#       then release sections (weights, nt embeddings, each existing generated entry),
#       then task_refs (last)
# ARGV: release section (1 + m), version, name, weights sha256, nt, channel, event,
#       then nt task names, nt embedding sha256s, nt generated sha256s ('' = none),
#       then the binding ref field of this version (last)
DELETE_HYPERNET_VERSION = _script(r"""
local a = 2 + tonumber(ARGV[1])
local nt = tonumber(ARGV[a + 3])
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOTFOUND', 'version'} end
if (tonumber(redis.call('HGET', KEYS[#KEYS], ARGV[#ARGV])) or 0) > 0 then
  return {'CONFLICT', 'a task is bound to this version'}
end
if redis.call('HGET', KEYS[1], 'sha256') ~= ARGV[a + 2] then return {'RETRY'} end
if redis.call('HLEN', KEYS[4]) ~= nt then return {'RETRY'} end
for i = 1, nt do
  if redis.call('HGET', KEYS[4], ARGV[a + 5 + i]) ~= ARGV[a + 5 + nt + i] then
    return {'RETRY'}
  end
  local gen = redis.call('HGET', KEYS[5 + i], 'sha256') or ''
  if gen ~= ARGV[a + 5 + 2 * nt + i] then return {'RETRY'} end
end
if not release_ready(6 + nt, 1) then return {'RETRY'} end
release(6 + nt, 1)
for i = 1, nt do redis.call('DEL', KEYS[5 + i]) end
redis.call('DEL', KEYS[1], KEYS[4])
redis.call('ZREM', KEYS[2], ARGV[a])
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[a + 1]) end
redis.call('INCR', KEYS[5])
redis.call('PUBLISH', ARGV[a + 4], ARGV[a + 5])
return {'OK'}
""")
