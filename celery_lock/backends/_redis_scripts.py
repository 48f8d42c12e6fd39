"""The Redis backend's Lua scripts: one round trip per lock operation, run by EVALSHA.

A lock key holds ``"<token> <fence> <json-metadata>"`` while held, and for 30 s after a release
a tombstone ``"~<token> <release id>"`` that every script treats as free. Scripts compare the
token by prefix: a token never contains a space, so ``"<token> "`` cannot match another holder's
value. Each script's header says what it takes (KEYS, ARGV) and returns.

Requires Redis >= 5 (script effects replication: the acquire script writes after TIME).
"""

from __future__ import annotations

import hashlib
from typing import Final, NamedTuple

__all__ = ["ACQUIRE", "BREAK", "EXTEND", "INSPECT", "RELEASE", "Lua"]


class Lua(NamedTuple):
    """A Lua script's source and the SHA1 that Redis names it by (EVALSHA)."""

    source: str
    sha: str


def _lua(source: str) -> Lua:
    # Our sources are ASCII, so the SHA does not depend on the client's encoding.
    return Lua(source, hashlib.sha1(source.encode("ascii"), usedforsecurity=False).hexdigest())


ACQUIRE: Final = _lua(
    """
-- Acquire, or confirm that we already hold the lock (a retried call after a lost reply).
-- KEYS[1] lock key, KEYS[2] fence counter (same hash tag)
-- ARGV[1] token, ARGV[2] holder metadata (JSON), ARGV[3] lease ttl (ms),
-- ARGV[4] fence counter ttl (ms)
-- returns {1, fence} acquired; {2, fence} already ours (ttl refreshed);
--         {0, pttl, value} held by someone else (their value carries holder metadata)
local value = redis.call('GET', KEYS[1])
-- A value starting with '~' is a released lock's tombstone (see RELEASE): free.
if value and string.byte(value, 1) ~= 126 then
  if string.sub(value, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {2, string.match(value, '^%S+ (%d+)')}
  end
  return {0, redis.call('PTTL', KEYS[1]), value}
end
-- The fence is max(last fence + 1, server clock in microseconds): strictly increasing while
-- the counter lives, and never below the clock, so grants a failed master handed out just
-- before it died (lost with it: replication is asynchronous) are below every grant made after
-- the failover, as long as the nodes' clocks agree to within the failover time. A double holds
-- microseconds since the epoch exactly (< 2^53 until the year 2255); '%.0f' prints it whole.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if not last or last >= 9007199254740991 then
  -- Not a number, or past 2^53 where a double cannot count by one: a planted or corrupted
  -- counter is refused (the store reports an error) rather than silently restarted.
  return redis.error_reply('ERR celery_lock fence counter is not a number in range')
end
local fence = string.format('%.0f', math.max(last + 1, now))
-- The counter expires with its key's use (arguments make keys unbounded); the clock term keeps
-- a fresh counter above the old one's fences.
redis.call('SET', KEYS[2], fence, 'PX', ARGV[4])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. fence .. ' ' .. ARGV[2], 'PX', ARGV[3])
return {1, fence}
"""
)

RELEASE: Final = _lua(
    """
-- Release: end the lock only while it still holds our token, then wake the waiters.
-- Instead of a DEL it leaves a short-lived tombstone '~<token> <release id>' (free for every
-- acquirer and reader). The release id is new for every release call, and a client that re-sends
-- a call after a lost reply re-sends the same one: the re-sent call finds its own tombstone and
-- learns that it succeeded, while a second release of the same lease (another call, through any
-- manager instance) finds a different id and is told the lease no longer held the lock.
-- The tombstone lives 30 s: well above a client's socket timeout times its retries.
-- KEYS[1] lock key; ARGV[1] token, ARGV[2] release id
-- returns 1 released (by this call, or by an earlier attempt of it whose reply was lost),
--         0 not ours (expired, taken over or released by another call: left alone)
local value = redis.call('GET', KEYS[1])
if not value then
  return 0
end
if string.sub(value, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  local set = redis.pcall('SET', KEYS[1], '~' .. ARGV[1] .. ' ' .. ARGV[2], 'PX', 30000)
  if type(set) == 'table' and set.err then
    -- At maxmemory with noeviction a SET is refused, a DEL is not. Releasing matters more
    -- than recognising a re-sent release.
    redis.call('DEL', KEYS[1])
  end
  redis.call('PUBLISH', KEYS[1] .. ':wake', '1')
  return 1
end
if value == '~' .. ARGV[1] .. ' ' .. ARGV[2] then
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
    """
-- Break: delete a lock judged breakable (dead holder, cleaner, break_lock) only if it still
-- holds exactly the value that was judged, so a successor's lock is never deleted.
-- KEYS[1] lock key; ARGV[1] the exact value read before, ARGV[2] wake-up channel
-- returns 1 deleted (waiters woken), 0 the lock changed meanwhile (left alone)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], '1')
  return 1
end
return 0
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
