"""Fetching politely: robots.txt and TDMRep opt-outs per host, a cap on connections per host, and
back-off on 429/503 that honours Retry-After within the URL's deadline.

One `Politeness` is shared by the threads of a downloader. robots.txt (RFC 9309, parsed by
protego) and `/.well-known/tdmrep.json` (W3C TDMRep) are fetched once per host under the same
network policy and byte caps as images; a host that answers 429 or 503 makes every thread wait
out its Retry-After before the next request to it.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from protego import Protego

from pipelines.ingest.fetch import Refused, Small

ROBOTS_CAP = 512 * 1024  # RFC 9309 2.5: crawlers parse at least the first 500 KiB
TDMREP_CAP = 256 * 1024
BACKOFF_STATUSES = (429, 503)

# (url, deadline, byte cap) -> the response, redirects followed; raises Refused on network errors
GetSmall = Callable[[str, float, int], Small]


@dataclass(frozen=True)
class Manners:
    """What a polite fetch honours (from DownloadConfig)."""

    robots: bool = True  # robots.txt rules for user_agent_token (then '*')
    tdmrep: bool = True  # TDMRep: the tdm-reservation header and /.well-known/tdmrep.json
    per_host: int = 4  # connections at once to one host, across the downloader's threads
    max_backoff_s: float = 60.0  # longest Retry-After honoured (still bounded by the URL deadline)
    user_agent_token: str = "racm3"


@dataclass
class HostRules:
    """What one host said about crawling it, fetched once per downloader."""

    robots: Protego | None = None  # None: allow all (robots.txt missing or unavailable)
    robots_unreachable: str = ""  # non-empty: 5xx or no answer, so RFC 9309 says disallow all
    tdm: list[dict] = field(default_factory=list)  # tdmrep.json rules, in their order
    uncached: bool = False  # the host could not be reached at all: ask again for the next URL


def origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme.lower()}://{p.netloc.lower()}"


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def tdm_reserved(rules: list[dict], path: str) -> dict | None:
    """The first tdmrep.json rule whose location matches `path`, if it reserves TDM rights."""
    for rule in rules:
        loc = str(rule.get("location", ""))
        if fnmatch.fnmatchcase(path, loc if loc.startswith("/") else "/" + loc):
            return rule if str(rule.get("tdm-reservation", "0")).strip() == "1" else None
    return None


def header_tdm_refusal(headers: dict[str, str]) -> Refused | None:
    """A response's own `tdm-reservation: 1` header (TDMRep's HTTP form)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if lowered.get("tdm-reservation", "").strip() == "1":
        policy = lowered.get("tdm-policy", "")
        return Refused("opted_out_tdm", "tdm-reservation: 1" + (f" (policy {policy})" if policy else ""))
    return None


class Politeness:
    """Per-host rules, connection slots and back-off, shared by a downloader's threads."""

    def __init__(self, manners: Manners, get_small: GetSmall):
        self.manners, self._get = manners, get_small
        self._lock = threading.Lock()
        self._rules: dict[str, HostRules] = {}
        self._host_locks: dict[str, threading.Lock] = {}
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._not_before: dict[str, float] = {}  # monotonic time before which a host is left alone
        self.robots_fetches = 0  # counted for tests and the shard's metrics

    def refusal(self, url: str, deadline: float) -> Refused | None:
        """Why `url` must not be fetched (robots.txt or TDMRep), or None."""
        if not (self.manners.robots or self.manners.tdmrep):
            return None
        rules = self._host_rules(origin(url), deadline)
        path = urlsplit(url).path or "/"
        if self.manners.robots:
            if rules.robots_unreachable:
                return Refused("robots_unreachable", f"robots.txt: {rules.robots_unreachable}")
            if rules.robots is not None and not rules.robots.can_fetch(url, self.manners.user_agent_token):
                return Refused("opted_out_robots",
                               f"robots.txt disallows {path} for {self.manners.user_agent_token}")
        if self.manners.tdmrep and (rule := tdm_reserved(rules.tdm, path)) is not None:
            return Refused("opted_out_tdm", f"tdmrep.json reserves {rule.get('location')}")
        return None

    @contextmanager
    def turn(self, url: str, deadline: float) -> Iterator[None]:
        """Hold one of the host's connection slots, after any back-off it asked for."""
        host = origin(url)
        slot = self._slot(host)
        if not slot.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise Refused("timeout", f"timeout: {host} had {self.manners.per_host} connections "
                                     "open until the URL deadline")
        try:
            self._wait_out_backoff(host, deadline)
            yield
        finally:
            slot.release()

    def backoff(self, url: str, retry_after: float | None, attempt: int) -> None:
        """A 429/503 from the host: nobody asks it again before Retry-After (or 1, 2, 4 ... s)."""
        wait = retry_after if retry_after is not None else float(2 ** attempt)
        wait = min(max(wait, 0.0), self.manners.max_backoff_s)
        host = origin(url)
        with self._lock:
            self._not_before[host] = max(self._not_before.get(host, 0.0), time.monotonic() + wait)

    def _wait_out_backoff(self, host: str, deadline: float) -> None:
        until = self._not_before.get(host, 0.0)
        if until <= time.monotonic():
            return
        if until >= deadline:
            raise Refused("rate_limited", f"rate_limited: {host} asked to wait "
                                          f"{until - time.monotonic():.1f} s, past the URL deadline")
        time.sleep(until - time.monotonic())

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            return self._slots.setdefault(host, threading.BoundedSemaphore(self.manners.per_host))

    def _host_rules(self, host: str, deadline: float) -> HostRules:
        with self._lock:
            if host in self._rules:
                return self._rules[host]
            lock = self._host_locks.setdefault(host, threading.Lock())
        with lock:  # one fetch of a host's rules; other threads for that host wait for it
            if host not in self._rules:
                rules = HostRules()
                if self.manners.robots:
                    self._load_robots(host, deadline, rules)
                if self.manners.tdmrep:
                    rules.tdm = self._load_tdmrep(host, deadline)
                if rules.uncached:  # the URL's own fetch will report why the host is unreachable
                    return rules
                with self._lock:
                    self._rules[host] = rules
            return self._rules[host]

    def _load_robots(self, host: str, deadline: float, rules: HostRules) -> None:
        self.robots_fetches += 1
        try:
            resp = self._get(host + "/robots.txt", deadline, ROBOTS_CAP)
        except Refused as e:
            if e.status == "too_many_redirects":  # RFC 9309 2.3.1.2: may count as unavailable
                return
            if str(e).startswith(("dns:", "connect:", "refused_address", "no_address")) \
                    or e.status == "refused_url":
                rules.uncached = True  # no server answered: the URL's own fetch says why
                return
            if e.status == "refused_address":
                return  # robots.txt redirected somewhere we never fetch: as if missing
            rules.robots_unreachable = str(e)
            return
        if 200 <= resp.status < 300:
            rules.robots = Protego.parse(resp.body.decode("utf-8", errors="replace"))
        elif resp.status >= 500:  # RFC 9309 2.3.1.4: unreachable means complete disallow
            rules.robots_unreachable = f"HTTP {resp.status}"
        # 4xx: RFC 9309 2.3.1.3, unavailable: allow all

    def _load_tdmrep(self, host: str, deadline: float) -> list[dict]:
        try:
            resp = self._get(host + "/.well-known/tdmrep.json", deadline, TDMREP_CAP)
        except Refused:
            return []  # no declaration reachable: TDMRep says no reservation was expressed
        if resp.status != 200 or resp.truncated:
            return []
        try:
            doc = json.loads(resp.body)
        except ValueError:
            return []
        return [r for r in doc if isinstance(r, dict)] if isinstance(doc, list) else []
