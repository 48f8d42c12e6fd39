"""The Redis backend's Lua scripts: one round trip per lock operation, run by EVALSHA.

A lock key holds ``"<token> <fence> <json-metadata>"`` while held, for 30 s after a release
a tombstone ``"~<token> <release id>"`` that every script treats as free, and while a release has
handed it to a waiting job a reservation ``"@<release id> <token> <task id>"`` (held for everyone
but that task id; ``-`` for the first two fields when a break handed it over). Jobs (``CLAIM``)
also use, under the same hash tag: ``:line`` (list of waiting task ids, first in line first),
``:wake-ups`` (hash task id -> the waiter's payload), ``:done:<task id>`` (a finished job) and
``:pending`` (coalescing: ``"r <task id>"`` reserved before its publish, ``"v <task id>"`` once
published; cleared when that job claims the key, unless it then waits in line).
Scripts compare the token by prefix: a token never contains a space, so ``"<token> "`` cannot
match another holder's value. Each script's header says what it takes (KEYS, ARGV) and returns.

Requires Redis >= 5 (script effects replication: the acquire script writes after TIME).
"""

from __future__ import annotations

import hashlib
import math
from typing import Final, NamedTuple

#: Fence counters live at least this long after the last grant (ms); see ``ACQUIRE``.
MIN_FENCE_TTL_MS: Final = 60_000

__all__ = [
    "ACQUIRE",
    "BREAK",
    "CLAIM",
    "COALESCE",
    "EXTEND",
    "INSPECT",
    "RELEASE",
    "REMOVE_WAITER",
    "REVEAL",
    "Lua",
    "grant_arg",
]


class Lua(NamedTuple):
    """A Lua script's source and the SHA1 that Redis names it by (EVALSHA)."""

    source: str
    sha: str


def grant_arg(ttl: float, token: str, meta: str) -> str:
    """ACQUIRE's and CLAIM's first argument, ``"<ttl (ms)> <token> <metadata>"`` (one argument:
    each costs the client about a microsecond to encode); the scripts' ``unpack_grant`` reads it."""
    return f"{math.ceil(ttl * 1000)} {token} {meta}"


def _lua(source: str) -> Lua:
    # Our sources are ASCII, so the SHA does not depend on the client's encoding.
    return Lua(source, hashlib.sha1(source.encode("ascii"), usedforsecurity=False).hexdigest())


#: Lua: set the lock to ``"<token> <fence> <meta>"`` with a new fence; returns the fence, or an
#: error reply (return it as is) for a counter that is not a number in range.
_GRANT = (
    f"local min_fence_ms = {MIN_FENCE_TTL_MS}\n"
    + """
local function grant(lock, counter, packed, mine, space, ttl_ms)
  -- packed is '<ttl> <token> <metadata>' (one script argument: each costs the client about a
  -- microsecond to encode), mine its '<token> ', space the index of the space after the token.
  -- The fence is max(last fence + 1, server clock in microseconds): strictly increasing while
  -- the counter lives, and never below the clock, so grants a failed master handed out just
  -- before it died (lost with it: replication is asynchronous) are below every grant made
  -- after the failover, as long as the nodes' clocks agree to within the failover time. A
  -- double holds microseconds since the epoch exactly (< 2^53 until the year 2255).
  local t = redis.call('TIME')
  -- The clock's digits: TIME's seconds, then its microseconds padded to six (formatting a
  -- number costs a script in Redis ~3 us, a third of this function; only the rare case
  -- where the counter is ahead of the clock formats one).
  local fence = t[1] .. string.sub('00000' .. t[2], -6)
  local last = tonumber(redis.call('GET', counter) or '0')
  if not last or last >= 9007199254740991 then
    -- Not a number, or past 2^53 where a double cannot count by one: a planted or corrupted
    -- counter is refused (the store reports an error) rather than silently restarted.
    return redis.error_reply('ERR celery_lock fence counter is not a number in range')
  end
  if last >= tonumber(fence) then
    fence = string.format('%.0f', last + 1)  -- whole: '%.0f' prints no exponent
  end
  -- The counter expires with its key's use (arguments make keys unbounded); the clock term
  -- keeps a fresh counter above the old one's fences.
  -- It lives max(2 * ttl, min_fence_ms): a Lua number, which Redis prints whole up to 10^17
  -- (ttls stop at 2^31 s).
  redis.call('SET', counter, fence, 'PX', math.max(tonumber(ttl_ms) * 2, min_fence_ms))
  redis.call('SET', lock, mine .. fence .. string.sub(packed, space), 'PX', ttl_ms)
  return fence
end

-- The parts of a packed '<ttl (ms)> <token> <metadata>': the ttl, the index of the space after
-- the token, and the token with that space (a token never has a space).
local function unpack_grant(packed)
  local from = string.find(packed, ' ', 1, true) + 1
  local space = string.find(packed, ' ', from, true)
  return string.sub(packed, 1, from - 2), space, string.sub(packed, from, space)
end
"""
)

ACQUIRE: Final = _lua(
    _GRANT
    + """
-- Acquire, or confirm that we already hold the lock (a retried call after a lost reply).
-- KEYS[1] lock key, KEYS[2] fence counter (same hash tag)
-- ARGV[1] '<lease ttl (ms)> <token> <holder metadata (JSON)>'
-- returns the fence (a bulk string: a reply table costs the server ~1 us more) when acquired
--         or already ours (ttl refreshed); {0, pttl, value} when held by someone else (their
--         value carries holder metadata; a reservation for a waiting job counts as held)
local ttl, space, mine = unpack_grant(ARGV[1])
local value = redis.call('GET', KEYS[1])
-- A value starting with '~' is a released lock's tombstone (see RELEASE): free.
if value and string.byte(value, 1) ~= 126 then
  if string.sub(value, 1, #mine) == mine then
    redis.call('PEXPIRE', KEYS[1], ttl)
    return string.match(value, '^%S+ (%d+)')
  end
  return {0, redis.call('PTTL', KEYS[1]), value}
end
return grant(KEYS[1], KEYS[2], ARGV[1], mine, space, ttl)  -- or a counter's error reply
"""
)

CLAIM: Final = _lua(
    _GRANT
    + """
-- Claim the lock for a job (a task id): ACQUIRE plus the job's done marker and waiter line.
-- KEYS[1] lock key, KEYS[2] fence counter, KEYS[3] line, KEYS[4] wake-ups,
-- KEYS[5] done marker of this task id, KEYS[6] coalescing marker (all under one hash tag)
-- ARGV[1] '<ttl (ms) of the lease and of a coalescing marker> <token> <metadata>',
-- ARGV[2] '<line ttl (ms)> <wait> <task id>', wait '1' to wait in line when held, 'k' when the
-- job will (it claims again with its payload), '0' when it will not; ARGV[3] the payload
-- (only with '1')
-- returns {3} the task id already finished; {1, fence} granted; {2, fence} already ours;
--         {0, pttl, value} held; {4, pttl, value} held, and the job waits in line
local ttl, space, mine = unpack_grant(ARGV[1])
local line_ttl, wait, task_id = string.match(ARGV[2], '^(%d+) (%S) (.*)$')
-- A coalescing marker naming this job ends here, unless the job waits (or will wait) in line.
local marker = redis.call('GET', KEYS[6])
if marker and string.sub(marker, 3) == task_id then
  redis.call('DEL', KEYS[6])
  marker = true
else
  marker = false
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  return {3}
end
local value = redis.call('GET', KEYS[1])
if value then
  local first = string.byte(value, 1)
  if first == 126 then
    value = false  -- a tombstone: free
  elseif first == 64 then
    if string.match(value, '^@%S+ %S+ (.*)$') == task_id then
      value = false  -- reserved for this job by a release
    end
  elseif string.sub(value, 1, #mine) == mine then
    redis.call('PEXPIRE', KEYS[1], ttl)
    return {2, string.match(value, '^%S+ (%d+)')}
  end
end
if value then
  local pttl = redis.call('PTTL', KEYS[1])
  if wait ~= '1' then
    if marker and wait == 'k' then
      redis.call('SET', KEYS[6], 'v ' .. task_id, 'PX', ttl)
    end
    return {0, pttl, value}
  end
  -- In line once per task id (a later copy replaces the payload, keeping the place).
  if redis.call('HSET', KEYS[4], task_id, ARGV[3]) == 1 then
    redis.call('RPUSH', KEYS[3], task_id)
  end
  redis.call('PEXPIRE', KEYS[3], line_ttl)
  redis.call('PEXPIRE', KEYS[4], line_ttl)
  if marker then
    redis.call('SET', KEYS[6], 'v ' .. task_id, 'PX', ttl)
  end
  return {4, pttl, value}
end
-- Free: granted; the job leaves the line if it was in it (it runs now).
if redis.call('HDEL', KEYS[4], task_id) == 1 then
  redis.call('LREM', KEYS[3], 0, task_id)
end
local fence = grant(KEYS[1], KEYS[2], ARGV[1], mine, space, ttl)
if type(fence) == 'table' then
  return fence
end
return {1, fence}
"""
)

#: Lua: give the key to the first waiter that has a payload (reserve it for that task id) and
#: return ``{task id, payload}``; nil when nobody waits. ``rest`` is ``"<release id> <token>"``.
_HAND_OFF = """
local function hand_off(lock, line, wakeups, rest, reserve_ms)
  while true do
    local head = redis.call('LPOP', line)
    if not head then
      return nil
    end
    local payload = redis.call('HGET', wakeups, head)
    if payload then
      redis.call('HDEL', wakeups, head)
      redis.call('SET', lock, '@' .. rest .. ' ' .. head, 'PX', reserve_ms)
      return {head, payload}
    end
  end
end
"""

RELEASE: Final = _lua(
    _HAND_OFF
    + """
-- Release: end the lock only while it still holds our token; hand it to the first waiting job
-- (reserved for it), or leave a short-lived tombstone '~<token> <release id>' (free for every
-- acquirer and reader) and wake the polling waiters. The release id is new for every release
-- call, and a client that re-sends a call after a lost reply re-sends the same one: the
-- re-sent call finds its own tombstone (or reservation) and learns that it succeeded, while a
-- second release of the same lease (another call, through any manager instance) finds a
-- different id and is told the lease no longer held the lock. The tombstone lives 30 s: well
-- above a client's socket timeout times its retries.
-- KEYS[1] lock key, KEYS[2] line, KEYS[3] wake-ups, and for a finished job KEYS[4] its done
-- marker; ARGV[1] '<token> <release id> <reservation ttl (ms)>' (one argument: each costs the
-- client about a microsecond to encode); for a finished job also ARGV[2] '<done marker ttl
-- (ms)> <mark> <task id>', mark '1' to mark it done even with no copy in line
-- returns 1 released (by this call, or by an earlier attempt of it whose reply was lost);
--         {1, task id, payload} released and handed to that waiting job;
--         0 not ours (expired, taken over or released by another call: left alone)
local token, rid, reserve_ms = string.match(ARGV[1], '^(%S+) (%S+) (%d+)$')
local value = redis.call('GET', KEYS[1])
if not value then
  return 0
end
if string.sub(value, 1, #token + 1) == token .. ' ' then
  if KEYS[4] then
    -- Copies of the finished job waiting in line are dropped, and later ones refused.
    local done_ms, mark, task_id = string.match(ARGV[2], '^(%d+) (%S) (.*)$')
    local copies = redis.call('HDEL', KEYS[3], task_id)
    if copies == 1 then
      redis.call('LREM', KEYS[2], 0, task_id)
    end
    if copies == 1 or mark == '1' then
      redis.call('SET', KEYS[4], '1', 'PX', done_ms)
    end
  end
  local turn = hand_off(KEYS[1], KEYS[2], KEYS[3], rid .. ' ' .. token, reserve_ms)
  if turn then
    return {1, turn[1], turn[2]}
  end
  local set = redis.pcall('SET', KEYS[1], '~' .. token .. ' ' .. rid, 'PX', 30000)
  if type(set) == 'table' and set.err then
    -- At maxmemory with noeviction a SET is refused, a DEL is not. Releasing matters more
    -- than recognising a re-sent release.
    redis.call('DEL', KEYS[1])
  end
  redis.pcall('PUBLISH', KEYS[1] .. ':wake', '1')
  return 1
end
if value == '~' .. token .. ' ' .. rid then
  return 1
end
local mine = '@' .. rid .. ' ' .. token .. ' '
if string.sub(value, 1, #mine) == mine then
  return 1
end
return 0
"""
)

EXTEND: Final = _lua(
    """
-- Extend: reset the lease ttl only while the lock still holds our token.
-- KEYS[1] lock key; ARGV[1] token, ARGV[2] new ttl (ms, >= 1: PEXPIRE 0 would delete the key,
-- redis/redis-py#4279)
-- returns 1 renewed, 0 not ours
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
)

BREAK: Final = _lua(
    _HAND_OFF
    + """
-- Break: end a lock judged breakable (dead holder, cleaner, break_lock) only if it still holds
-- exactly the value that was judged, so a successor's lock is never deleted; hand it to the
-- first waiting job, or delete it and wake the polling waiters.
-- KEYS[1] lock key, KEYS[2] line, KEYS[3] wake-ups; ARGV[1] the exact value read before,
-- ARGV[2] reservation ttl (ms)
-- returns {1} broken; {1, task id, payload} broken and handed to that job; {0} the lock
-- changed meanwhile (left alone)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0}
end
local turn = hand_off(KEYS[1], KEYS[2], KEYS[3], '- -', ARGV[2])
if turn then
  return {1, turn[1], turn[2]}
end
redis.call('DEL', KEYS[1])
redis.pcall('PUBLISH', KEYS[1] .. ':wake', '1')
return {1}
"""
)

REMOVE_WAITER: Final = _lua(
    _HAND_OFF
    + """
-- Remove a job from the line (it was revoked); if the key is reserved for it, hand the key to
-- the next waiting job, or free it.
-- KEYS[1] lock key, KEYS[2] line, KEYS[3] wake-ups, KEYS[4] coalescing marker;
-- ARGV[1] task id, ARGV[2] reservation ttl
-- returns {removed (0/1)} or {1, task id, payload} when the key went to the next job
local marker = redis.call('GET', KEYS[4])
if marker and string.sub(marker, 3) == ARGV[1] then
  redis.call('DEL', KEYS[4])
end
local removed = redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('LREM', KEYS[2], 0, ARGV[1])
local value = redis.call('GET', KEYS[1])
if value and string.byte(value, 1) == 64 and string.match(value, '^@%S+ %S+ (.*)$') == ARGV[1] then
  local turn = hand_off(KEYS[1], KEYS[2], KEYS[3], '- -', ARGV[2])
  if turn then
    return {1, turn[1], turn[2]}
  end
  redis.call('DEL', KEYS[1])
  redis.pcall('PUBLISH', KEYS[1] .. ':wake', '1')
  return {1}
end
return {removed}
"""
)

INSPECT: Final = _lua(
    """
-- Inspect: value and remaining ttl in one round trip, read atomically.
-- KEYS[1] lock key
-- returns nil when free, else {value, pttl ms}
local value = redis.call('GET', KEYS[1])
if not value or string.byte(value, 1) == 126 then  -- '~': a released lock's tombstone
  return false
end
return {value, redis.call('PTTL', KEYS[1])}
"""
)

COALESCE: Final = _lua(
    """
-- Coalescing at publish time: the call a new one can share, or a reservation for the new one.
-- KEYS[1] lock key, KEYS[2] coalescing marker; ARGV[1] the new call's task id,
-- ARGV[2] 'e' (EXECUTION: a running holder counts too) or 'q', ARGV[3] marker ttl (ms)
-- returns {1, task id} an identical call waits (published, not started);
--         {2, task id} EXECUTION: an identical call runs (or the key is reserved for it);
--         {0} nothing to share: the marker is reserved for the new call (not visible yet)
local marker = redis.call('GET', KEYS[2])
if marker and string.sub(marker, 1, 2) == 'v ' then
  return {1, string.sub(marker, 3)}
end
if ARGV[2] == 'e' then
  local value = redis.call('GET', KEYS[1])
  if value and string.byte(value, 1) == 64 then
    local waiter = string.match(value, '^@%S+ %S+ (.*)$')
    if waiter then
      return {2, waiter}
    end
  elseif value and string.byte(value, 1) ~= 126 then
    local ok, meta = pcall(cjson.decode, string.match(value, '^%S+ %d+ (.*)$') or '')
    if ok and type(meta) == 'table' and type(meta['task_id']) == 'string' then
      return {2, meta['task_id']}
    end
  end
end
redis.call('SET', KEYS[2], 'r ' .. ARGV[1], 'PX', ARGV[3])
return {0}
"""
)

REVEAL: Final = _lua(
    """
-- After the publish: make our reserved marker visible ('1'), or drop it ('0': the publish
-- failed). A marker that changed meanwhile (another call reserved it) is left alone.
-- KEYS[1] coalescing marker; ARGV[1] task id, ARGV[2] '1' reveal / '0' drop
-- returns 1 done, 0 the marker is not ours
local marker = redis.call('GET', KEYS[1])
if marker ~= 'r ' .. ARGV[1] and marker ~= 'v ' .. ARGV[1] then
  return 0
end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
  return 1
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then
  redis.call('SET', KEYS[1], 'v ' .. ARGV[1], 'PX', pttl)
end
return 1
"""
)
