"""The settlement journal: what an answered call owes is on disk before the store is asked.

A client can have its whole answer while the store is away (killed, restarting, failing over)
or while the gateway is being stopped. Retrying in memory is not enough: a gateway stopped or
killed meanwhile forgets the debt, and the orphan sweeper later bills only what the hold's
checkpoint knew. So every settlement (and every release of a hold) is first appended to a
segment file in the journal directory, then sent; the store's answer, and then its fsync
(`Ledger.confirm`, one round for every entry answered meanwhile), acknowledges it. One that
the store does not take, or whose fsync cannot be confirmed, stays in memory and on disk, is
retried with backoff until the store answers, and a segment whose entries are all
acknowledged is deleted. So a store that fsyncs once a second loses no answered call's
settlement when it is killed: the journal still has it and sends it again.

A restart (or any other gateway sharing the directory) adopts the segments of processes that
are gone: each segment is locked (`flock`) by its writer for as long as that process lives, so
a segment anyone can lock belongs to nobody. Its entries are sent again; the scripts are
idempotent per request id (a settlement answers `duplicate`, a release finds no hold), so an
entry that had landed before the writer died charges nothing twice.

Segment names carry the store's identity, so a directory shared by gateways of different
stores never replays an entry onto the wrong one; a settlement older than the store remembers
settled request ids for is set aside, not replayed (it could be charged twice). Appends are
plain writes (the page cache outlives the process, so any gateway death keeps them); an entry
that goes unacknowledged is fsynced (off the event loop) once the journal is all that has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.errors import GatewayError, LedgerUnavailable
from gateway.ledger.ledger import Ledger
from gateway.ledger.records import TokenCharge
from gateway.observability.logging import get_logger
from gateway.store.client import without_credentials

__all__ = ["Entry", "SettlementJournal", "store_identity"]

log = get_logger("gateway.journal")

# A segment takes new entries for this long (or this many) before the next one starts, so a
# busy gateway's acknowledged entries are deleted with their segment soon after.
SEGMENT_SECONDS = 2.0
SEGMENT_ENTRIES = 20_000
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
ADOPT_EVERY_S = 5.0
REPLAY_BATCH = 64
CLOSE_REPLAY_S = 3.0  # at shutdown, how long the store may take to answer the owed entries


def store_identity(store_url: str, embedded: bool) -> str:
    """A short, stable name of the store a journal belongs to. The embedded store is named by
    its data directory (its port changes with every start), any other store by its URL
    without credentials (a rotated password names the same store)."""
    if embedded:
        return "embedded"
    return hashlib.sha256(without_credentials(store_url).encode()).hexdigest()[:12]


@dataclass(slots=True)
class Entry:
    """One settlement (or release) the ledger owes, in the terms of `Ledger.settle`."""

    account_id: str
    request_id: str
    release: bool = False  # drop the hold without charging (the call failed before a byte)
    cost: int = 0
    now_ms: int = 0
    record: dict[str, Any] = field(default_factory=dict)
    charge: TokenCharge | None = None
    actual_tokens: int = 0

    def encode(self) -> bytes:
        charge = self.charge
        return orjson.dumps(
            {
                "a": self.account_id,
                "r": self.request_id,
                "x": self.release,
                "c": self.cost,
                "t": self.now_ms,
                "rec": self.record,
                "ch": None if charge is None else [charge.model, charge.tokens, *charge.windows],
                "n": self.actual_tokens,
            }
        )

    @classmethod
    def decode(cls, line: bytes) -> Entry:
        raw = orjson.loads(line)
        ch = raw["ch"]
        # An entry of an earlier version has no key window (its keys had no token limits).
        charge = (
            None
            if ch is None
            else TokenCharge(ch[0], int(ch[1]), (ch[2], ch[3], ch[4] if len(ch) > 4 else ""))
        )
        return cls(
            account_id=raw["a"],
            request_id=raw["r"],
            release=bool(raw["x"]),
            cost=int(raw["c"]),
            now_ms=int(raw["t"]),
            record=raw["rec"],
            charge=charge,
            actual_tokens=int(raw["n"]),
        )


class _Segment:
    """One append-only file of entries, locked by its writer while it lives."""

    __slots__ = (
        "done",
        "fd",
        "opened",
        "path",
        "pending",
        "synced",
        "syncing",
        "unacked",
        "written",
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.opened = time.monotonic()
        self.written = 0
        self.unacked = 0
        self.synced = True
        self.syncing = False  # an fsync of it runs in a thread: its fd stays open until then
        self.done = False
        self.pending: list[bytes] = []  # appended this turn of the loop, written at its end

    def append(self, line: bytes) -> None:
        """Take the entry; the entries of one turn of the event loop go in one write at its
        end (`call_soon`), one system call instead of one per settlement. A gateway killed
        before that write loses those entries as one killed just before `append` would: the
        answers were written first, so their holds are billed by the orphan sweeper from
        their checkpoints (the window is one turn of the loop longer)."""
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(line)
        self.written += 1
        self.unacked += 1
        self.synced = False

    def flush(self) -> None:
        if self.pending and not self.done:
            data, self.pending = b"".join(self.pending), []
            try:
                os.write(self.fd, data)
            except OSError as exc:  # a full disk, say: the settlements are sent all the same
                log.error(
                    "journal write failed; these settlements are not journaled",
                    segment=self.path.name,
                    entries=data.count(b"\n"),
                    error=str(exc),
                )

    async def sync(self) -> None:
        """fsync (in a thread) until nothing written meanwhile is left out."""
        if self.syncing:
            return
        self.syncing = True
        try:
            while not self.synced and not self.done:
                self.synced = True
                self.flush()
                await asyncio.to_thread(os.fsync, self.fd)
        except OSError as exc:
            log.error("journal fsync failed", segment=self.path.name, error=str(exc))
        finally:
            self.syncing = False
            if self.done:
                os.close(self.fd)

    def remove(self) -> None:
        """Every entry is acknowledged: the file goes (unlinked while still locked)."""
        self.path.unlink(missing_ok=True)
        self._finish()

    def close(self) -> None:
        """Keep the file (entries still owed) for the next gateway to adopt."""
        self.flush()
        if not self.syncing:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
        self._finish()

    def _finish(self) -> None:
        self.done = True
        if not self.syncing:  # else the fsync in flight closes it when it returns
            os.close(self.fd)


class SettlementJournal:
    """Write-ahead journal of one process's settlements, and the replayer of owed ones."""

    def __init__(self, ledger: Ledger, directory: str | Path, store_id: str) -> None:
        self.ledger = ledger
        self.directory = Path(directory)
        self.store_id = store_id
        self._prefix = f"settle-{store_id}-"
        self._seq = 0
        self._current: _Segment | None = None
        self._segments: dict[int, _Segment] = {}  # seq -> segment with unacknowledged entries
        self._owed: dict[str, tuple[Entry, int]] = {}  # request id -> (entry, segment seq)
        self._wake = asyncio.Event()
        self._adopted_at = float("-inf")
        self._syncs: set[asyncio.Future[None]] = set()  # fsyncs in flight (kept referenced)
        # Entries the store answered, waiting for its fsync to be confirmed (in rounds).
        self._landing: list[tuple[Entry, int]] = []
        self._confirming: asyncio.Task[None] | None = None
        self.store_failures = 0  # consecutive replays the store did not answer
        # With history on: which of these stale entries' requests the history database proves
        # settled (their ids), or None when it cannot vouch (its export is behind); see
        # `_vouched`.
        self.history_check: Callable[[list[Entry]], Awaitable[set[str] | None]] | None = None

    # the hot path ---------------------------------------------------------------------------

    async def submit(self, entry: Entry) -> None:
        """Journal the entry, send it, and acknowledge it; one the store does not take now is
        owed (fsynced, retried in the background) and this returns at once."""
        seq = self._append(entry)
        try:
            await self._send(entry)
        except LedgerUnavailable as exc:
            self._owe(entry, seq, str(exc))
            return
        except GatewayError as exc:  # the store refused it: retrying cannot help
            self._acknowledge(seq)
            self._refused(entry, exc)
            return
        self._landed(entry, seq)

    def _landed(self, entry: Entry, seq: int) -> None:
        """The store answered the entry: acknowledge it once the store's fsync covers it."""
        if self.ledger.confirmer is None:
            self._acknowledge(seq)
            return
        self._landing.append((entry, seq))
        if self._confirming is None:
            self._confirming = asyncio.ensure_future(self._confirm_landed())

    async def _confirm_landed(self) -> None:
        try:
            while self._landing:
                batch, self._landing = self._landing, []
                try:
                    await self.ledger.confirm()
                except GatewayError as exc:  # maybe lost with the store: send it again
                    for entry, seq in batch:
                        self._owe(entry, seq, f"not confirmed on the store's disk: {exc}")
                else:
                    for _, seq in batch:
                        self._acknowledge(seq)
        finally:
            self._confirming = None

    def _append(self, entry: Entry) -> int:
        segment = self._current
        if segment is None or (
            segment.written >= SEGMENT_ENTRIES
            or time.monotonic() - segment.opened >= SEGMENT_SECONDS
        ):
            segment = self._rotate()
        segment.append(entry.encode() + b"\n")
        return self._seq

    def _rotate(self) -> _Segment:
        old = self._current
        if old is not None and old.unacked == 0:
            self._segments.pop(self._seq, None)
            old.remove()
        self._seq += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{self._prefix}{os.getpid()}-{time.time_ns()}-{self._seq}.jsonl"
        segment = self._current = _Segment(self.directory / name)
        self._segments[self._seq] = segment
        return segment

    def _acknowledge(self, seq: int) -> None:
        segment = self._segments.get(seq)
        if segment is None:
            return
        segment.unacked -= 1
        if segment.unacked == 0 and segment is not self._current:
            del self._segments[seq]
            segment.remove()

    def _owe(self, entry: Entry, seq: int, reason: str) -> None:
        segment = self._segments.get(seq)
        if segment is not None and not segment.synced and not segment.syncing:
            # The journal is now all that remembers this debt: fsync it (off the loop; one
            # fsync covers every entry written before it).
            task = asyncio.ensure_future(segment.sync())
            self._syncs.add(task)
            task.add_done_callback(self._syncs.discard)
        if not self._owed:
            log.warning("store did not take a settlement; journaled for replay", error=reason)
        self._owed[entry.request_id] = (entry, seq)
        self._wake.set()

    async def _send(self, entry: Entry) -> None:
        if entry.release:
            await self.ledger.release(entry.account_id, entry.request_id)
            return
        await self.ledger.settle(
            entry.account_id,
            entry.request_id,
            entry.cost,
            entry.now_ms,
            entry.record,
            charge=entry.charge,
            actual_tokens=entry.actual_tokens,
        )

    @staticmethod
    def _refused(entry: Entry, exc: GatewayError) -> None:
        log.error(
            "the ledger refused a settlement; it is not retried",
            request_id=entry.request_id,
            account=entry.account_id,
            record=entry.record,
            error=str(exc),
        )

    # the replayer -----------------------------------------------------------------------------

    @property
    def owed(self) -> int:
        """Settlements of this process the store has not acknowledged yet."""
        return len(self._owed)

    async def run(self) -> None:
        """Adopt dead processes' segments and replay owed entries until cancelled."""
        delay = RETRY_FIRST_S
        while True:
            try:
                if time.monotonic() - self._adopted_at >= ADOPT_EVERY_S:
                    await self.adopt()
                if self._owed and not await self.replay_owed():
                    delay = min(RETRY_MAX_S, delay * 2)
                    await asyncio.sleep(delay)
                    continue
            except Exception:
                log.exception("journal replay failed")
            delay = RETRY_FIRST_S
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ADOPT_EVERY_S):
                    await self._wake.wait()

    async def settled_up(self) -> bool:
        """Adopt and replay now; True when nothing this journal knows of is owed. The orphan
        sweeper asks first: a journaled settlement must land before a sweeper, seeing an ended
        lease, bills the call from its checkpoint instead."""
        await self.adopt()
        return not self._owed or await self.replay_owed()

    async def replay_owed(self) -> bool:
        """Send every owed entry again; True when all landed. An entry owed longer than its
        settled marker lives (a store down that long: the marker of a settlement whose reply
        was lost may have expired meanwhile) is checked against the history database first,
        as an adopted one is (`_vouched`); while the database cannot vouch, it stays owed."""
        items = await self._checked(list(self._owed.items()))
        waiting = len(self._owed) - len(items)
        landed: list[str] = []
        for start in range(0, len(items), REPLAY_BATCH):
            batch = items[start : start + REPLAY_BATCH]
            results = await asyncio.gather(
                *(self._send(entry) for _, (entry, _) in batch), return_exceptions=True
            )
            for (request_id, (entry, _)), result in zip(batch, results, strict=True):
                if isinstance(result, LedgerUnavailable):
                    self.store_failures += 1
                    return False
                if isinstance(result, GatewayError):
                    self._refused(entry, result)
                elif isinstance(result, BaseException):
                    raise result
                landed.append(request_id)
        try:
            await self.ledger.confirm()  # acknowledged only once on the store's disk
        except LedgerUnavailable:
            self.store_failures += 1
            return False
        for request_id in landed:
            if (owed := self._owed.pop(request_id, None)) is not None:
                self._acknowledge(owed[1])
        if self.store_failures:
            log.info("journaled settlements replayed", count=len(items))
        self.store_failures = 0
        return not waiting

    async def _checked(
        self, items: list[tuple[str, tuple[Entry, int]]]
    ) -> list[tuple[str, tuple[Entry, int]]]:
        """The owed entries to send now: old ones the database proves settled are
        acknowledged, those it cannot vouch for are held back (with history off, every entry
        goes: its marker lives 7 days)."""
        if self.history_check is None:
            return items
        cutoff = stale_cutoff(self.ledger.settled_ttl)
        stale = [e for _, (e, _) in items if not e.release and e.now_ms < cutoff]
        if not stale:
            return items
        settled = await self.history_check(stale)
        old = {e.request_id for e in stale}
        if settled is None:
            log.warning(
                "owed settlements older than their markers wait for the history export",
                count=len(old),
            )
            return [item for item in items if item[0] not in old]
        for request_id in settled & old:
            _, seq = self._owed.pop(request_id)
            self._acknowledge(seq)
        return [item for item in items if item[0] not in settled]

    def _orphan_segments(self) -> Iterator[Path]:
        mine = {segment.path for segment in self._segments.values()}
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob(f"{self._prefix}*.jsonl")):
            if path not in mine:
                yield path

    async def adopt(self) -> int:
        """Replay the segments no living process holds; returns the entries replayed."""
        self._adopted_at = time.monotonic()
        replayed = 0
        for path in self._orphan_segments():
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # its writer just removed it
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its writer is alive
                if not path.exists():
                    continue  # removed between our open and our lock
                entries = await self._vouched(
                    path, [Entry.decode(line) for line in _read_lines(fd)]
                )
                if entries:
                    log.warning(
                        "replaying a journal left by a stopped gateway",
                        segment=path.name,
                        entries=len(entries),
                    )
                for start in range(0, len(entries), REPLAY_BATCH):
                    batch = entries[start : start + REPLAY_BATCH]
                    results = await asyncio.gather(
                        *(self._send(entry) for entry in batch), return_exceptions=True
                    )
                    for entry, result in zip(batch, results, strict=True):
                        if isinstance(result, LedgerUnavailable):
                            raise result
                        if isinstance(result, GatewayError):
                            self._refused(entry, result)
                        elif isinstance(result, BaseException):
                            raise result
                await self.ledger.confirm()  # the file goes only once the store's disk has it
                replayed += len(entries)
                path.unlink(missing_ok=True)
            except LedgerUnavailable:
                return replayed  # the file stays; the next pass tries again
            finally:
                os.close(fd)
        return replayed

    async def _vouched(self, path: Path, entries: list[Entry]) -> list[Entry]:
        """The entries still safe to send again. A settlement is idempotent only while the
        store remembers its request id (`ledger.settled_ttl`): one older than that (see
        `stale_cutoff`) could be charged twice. With history on, the database decides: a
        request it has is settled (the entry is dropped), one it lacks never was (sent
        again), as long as its export is not behind; otherwise, and with history off, such
        an entry is set aside in `<segment>.stale` for an operator."""
        cutoff = stale_cutoff(self.ledger.settled_ttl)
        stale = [e for e in entries if not e.release and e.now_ms < cutoff]
        if not stale:
            return entries
        settled = await self.history_check(stale) if self.history_check is not None else None
        if settled is None:
            return _set_aside(path, entries, stale)
        log.warning(
            "old journal entries checked against the history database",
            segment=path.name,
            settled=len([e for e in stale if e.request_id in settled]),
            replayed=len([e for e in stale if e.request_id not in settled]),
        )
        return [e for e in entries if e.release or e.request_id not in settled]

    async def close(self) -> None:
        """At shutdown: a last bounded replay; what is still owed (or not yet confirmed on
        the store's disk) stays on disk."""
        with contextlib.suppress(TimeoutError, LedgerUnavailable):
            async with asyncio.timeout(CLOSE_REPLAY_S):
                if self._confirming is not None:
                    await asyncio.shield(self._confirming)
                for _ in range(int(CLOSE_REPLAY_S / RETRY_FIRST_S)):
                    if not self._owed or await self.replay_owed():
                        break
                    await asyncio.sleep(RETRY_FIRST_S)
        if self._owed:
            log.error(
                "settlements still owed at shutdown are kept in the journal",
                count=len(self._owed),
                directory=str(self.directory),
            )
        for segment in list(self._segments.values()):
            if segment.unacked == 0:
                segment.remove()
            else:
                segment.close()
        self._segments.clear()
        self._current = None


def stale_cutoff(ttl_seconds: int) -> int:
    """The time (ms) before which a settlement may have outlived its settled marker: its
    marker's TTL ago, less a margin (a quarter of it, at most a day) for the time between the
    entry and its first settlement."""
    margin = min(86400, ttl_seconds // 4)
    return int(time.time() * 1000) - (ttl_seconds - margin) * 1000


def _set_aside(path: Path, entries: list[Entry], stale: list[Entry]) -> list[Entry]:
    """Keep `stale` in `<segment>.stale` for an operator (logged); the rest goes on."""
    with open(path.with_suffix(".stale"), "ab") as out:
        out.writelines(e.encode() + b"\n" for e in stale)
    log.error(
        "journal entries too old to replay safely were set aside",
        segment=path.name,
        entries=len(stale),
        kept_in=path.with_suffix(".stale").name,
    )
    kept = {id(e) for e in stale}
    return [e for e in entries if id(e) not in kept]


def _read_lines(fd: int) -> list[bytes]:
    """The complete lines of a segment (a torn last line, from a crash mid-write, is skipped:
    its settlement was never sent)."""
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    data = b"".join(chunks)
    lines = data.split(b"\n")
    return [line for line in lines[:-1] if line]
