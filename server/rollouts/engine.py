"""The rollout engine: starts each rollout's devices at its rate, and follows
each written device to its outcome (docs/rollouts.md).

It runs as `pulse rollouts` (and inside `pulse run`), in a process of its
own rather than in the evaluator's: there it shared one event loop with the
ingest and the publisher of the devices it wrote to, and wrote at 0.37 of a
plain write loop instead of 0.85 to 0.92 (bench/rollouts.py).
Any number may run: a rollout is worked on only in a transaction that holds
its row's lock (SKIP LOCKED, so engines share rollouts instead of queueing on
one), and everything a tick does, the desired writes and their outbox rows
included, commits together or not at all. A tick killed midway leaves no
device written and none recorded as started; the next tick, here or
elsewhere, does that work again from the same state. The rate's bookkeeping
is in the same row, so two engines cannot start more than it allows between
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from server import filters, transient
from server.connectivity.transitions import EVALUATOR_ROLE
from server.db import Connection, Database
from server.errors import FieldViolation, InvalidArgument, NotFound
from server.rollouts import rules, store
from server.twin import documents
from server.twin import store as twin_store
from server.twin.merge_patch import apply_merge_patch
from server.twin.notify import ChangeNotifier

log = logging.getLogger(__name__)

_AFTER_BUG_S = 5.0


@dataclass(frozen=True, slots=True)
class Tuning:
    #: Most devices started per rollout per transaction.
    start_batch: int = 500
    #: Written devices looked at per rollout per transaction.
    judge_batch: int = 2000
    #: How soon after a pass over the written devices the next one begins.
    check_interval: timedelta = timedelta(seconds=1)
    #: How often a continuous rollout looks for devices new in its target.
    enrol_interval: timedelta = timedelta(seconds=5)
    #: How often the engine looks for rollouts with work when it has none.
    poll_s: float = 0.25


class RolloutEngine:
    def __init__(
        self,
        db: Database,
        *,
        stale_after: timedelta = filters.DEFAULT_TWIN_STALE_AFTER,
        tuning: Tuning | None = None,
    ) -> None:
        self._db = db
        self._stale_after = stale_after
        self._tuning = tuning or Tuning()
        self._notifier = ChangeNotifier(db)
        self._failed: dict[tuple[uuid.UUID, str], float] = {}
        #: Desired writes made by this engine.
        self.writes = 0

    async def run(self) -> None:
        """Work until cancelled."""
        try:
            while True:
                try:
                    busy = await transient.retry_forever(self.run_once, log=log, what="rollouts")
                except Exception:
                    log.exception("the rollout engine failed; retrying")
                    busy = False
                    await asyncio.sleep(_AFTER_BUG_S)
                if not busy:
                    await asyncio.sleep(self._tuning.poll_s)
        finally:
            with contextlib.suppress(Exception):
                await self._notifier.flush()

    async def run_once(self) -> bool:
        """One tick of every rollout with work now; whether any was done."""
        async with self._db.transaction(
            f"BEGIN READ ONLY; SET LOCAL ROLE {EVALUATOR_ROLE}", readonly=True
        ) as con:
            work = await store.due(con, limit=100)
        worked = False
        now = time.monotonic()
        for key in work:
            if now - self._failed.get(key, -_AFTER_BUG_S) < _AFTER_BUG_S:
                continue
            tenant_id, rollout_id = key
            try:
                worked |= await self.tick(tenant_id, rollout_id)
            except transient.TRANSIENT:
                raise
            except Exception:
                # One rollout's bug must not stop the others.
                log.exception("rollout %s of tenant %s failed", rollout_id, tenant_id)
                self._failed[key] = now
                continue
            self._failed.pop(key, None)
        return worked

    async def tick(self, tenant_id: uuid.UUID, rollout_id: str) -> bool:
        """One transaction's work on one rollout; False if another engine
        holds it or it had nothing due."""
        async with self._db.tenant(tenant_id) as con:
            leased = await store.lease(con, tenant_id, rollout_id)
            if leased is None:
                return False
            rollout, now = leased
            tick = _Tick(con, tenant_id, rollout, now, self._tuning, self._stale_after)
            await tick.run()
        self.writes += len(tick.written)
        self._notifier.changed(tenant_id, tick.written)
        if tick.changed:
            await store.announce(self._db, tenant_id, rollout_id)
        return True


class _Tick:
    def __init__(
        self,
        con: Connection,
        tenant_id: uuid.UUID,
        rollout: store.RolloutRecord,
        now: datetime,
        tuning: Tuning,
        stale_after: timedelta,
    ) -> None:
        self.con = con
        self.tenant_id = tenant_id
        self.rollout = rollout
        self.now = now
        self.tuning = tuning
        self.stale_after = stale_after
        self.state = rollout.state
        self.reason = rollout.state_reason
        self.next_check = now + timedelta(days=1)
        self.next_enrol = rollout.next_enrol_at
        #: Starts counted against the rate: the writes, and those forfeited.
        self.counted = 0
        #: Devices enrolled, started or given an outcome.
        self.moved = 0
        #: (device_id, twin revision) of every desired write, for watchers.
        self.written: list[tuple[str, int]] = []

    def _check_by(self, when: datetime) -> None:
        self.next_check = min(self.next_check, when)

    @property
    def changed(self) -> bool:
        """Whether a watcher has anything new to see."""
        return self.state != self.rollout.state or bool(self.moved)

    async def run(self) -> None:
        judged_at, through = self.rollout.judged_at, self.rollout.judged_through
        if through or self.now >= judged_at + self.tuning.check_interval:
            through = await self._judge(after=through)
            if not through:
                judged_at = self.now
        counts = await store.counts(self.con, self.tenant_id, self.rollout.rollout_id)
        if self.state == rules.RUNNING:
            await self._abort_if(counts)
        if self.state == rules.RUNNING:
            await self._start()
            counts = await store.counts(self.con, self.tenant_id, self.rollout.rollout_id)
            if not self.rollout.continuous and counts.pending == 0 and counts.applied == 0:
                self._end(rules.DONE, rules.finished_reason(counts))
        if counts.applied > 0:
            self._check_by(self.now + self.tuning.check_interval)
        await store.save_progress(
            self.con,
            self.tenant_id,
            self.rollout.rollout_id,
            state=self.state,
            reason=self.reason,
            counted=self.counted,
            next_check_at=self.next_check,
            next_enrol_at=self.next_enrol,
            judged_at=judged_at,
            judged_through=through,
        )

    async def _judge(self, *, after: str) -> str:
        """Give the next slice of written devices whose twin changed their
        outcome; the last device_id looked at ('' at the end: the next tick
        goes on from there)."""
        r = self.rollout
        path = filters.split_twin_path(r.failure_path) if r.failure_path else ()
        batch, through = await store.applied_to_judge(
            self.con, self.tenant_id, r.rollout_id, after=after, limit=self.tuning.judge_batch
        )
        outcomes: list[tuple[str, str, str]] = []
        seen: list[tuple[str, int]] = []
        for a in batch:
            twin = None
            if a.lifecycle is not None and a.revision is not None:
                assert a.desired is not None and a.reported is not None
                assert a.reported_version is not None
                twin = rules.Twin(
                    active=a.lifecycle == "ACTIVE",
                    desired=a.desired,
                    reported=a.reported,
                    reported_version=a.reported_version,
                )
            found = rules.outcome(
                twin,
                patch=r.patch,
                written_version=a.written_version,
                failure_path=path,
                deadline=a.deadline,
                now=self.now,
                describe=_json,
            )
            if found is not None:
                outcomes.append((a.device_id, *found))
            elif a.revision is not None:
                seen.append((a.device_id, a.revision))
        await store.record_outcomes(self.con, self.tenant_id, r.rollout_id, outcomes, seen)
        self.moved += len(outcomes)
        if through:
            self._check_by(self.now)
        return through

    async def _abort_if(self, counts: rules.Counts) -> None:
        r = self.rollout
        if r.canary_count:
            failed = await store.first_failed_canary(self.con, self.tenant_id, r.rollout_id)
            if failed is not None:
                device_id, state, detail = failed
                self._end(
                    rules.ABORTED,
                    f"canary device {device_id!r} {state.lower().replace('_', ' ')}: {detail}",
                )
                return
        reason = rules.abort_reason(
            counts, threshold_percent=r.abort_threshold_percent, min_count=r.abort_min_count
        )
        if reason is not None:
            self._end(rules.ABORTED, reason)

    def _end(self, state: str, reason: str) -> None:
        self.state, self.reason = state, reason
        log.info("rollout %s %s: %s", self.rollout.rollout_id, state.lower(), reason)

    async def _start(self) -> None:
        r = self.rollout
        try:
            target = await store.target(self.con, self.tenant_id, r)
        except NotFound:
            self._end(rules.ABORTED, f"the target group {r.target_group_id!r} was deleted")
            return
        if r.continuous and self.now >= r.next_enrol_at:
            self.moved += await store.enrol(
                self.con, self.tenant_id, r.rollout_id, target, stale_after=self.stale_after
            )
            self.next_enrol = self.now + self.tuning.enrol_interval
        if r.continuous:
            self._check_by(self.next_enrol)
        budget = self.tuning.start_batch
        allowance = rules.start_budget(
            max_per_minute=r.max_per_minute,
            since=r.rate_since,
            started_since=r.started_since,
            now=self.now,
        )
        self.counted += allowance.forfeited
        by_rate = allowance.starts is not None and allowance.starts <= budget
        if allowance.starts is not None:
            budget = min(budget, allowance.starts)
        canary = False
        if r.canary_count:
            canaries = await store.canary_counts(self.con, self.tenant_id, r.rollout_id)
            if canaries.succeeded < r.canary_count:
                # Replace canaries that ended without proving anything
                # (skipped, superseded) until enough have succeeded.
                canary = True
                budget = min(budget, r.canary_count - canaries.succeeded - canaries.applied)
                self._check_by(self.now + self.tuning.check_interval)
        if budget <= 0:
            self._wait_for_rate()
            return
        device_ids = await store.pending(self.con, self.tenant_id, r.rollout_id, limit=budget)
        starts = await self._write(target, device_ids, canary=canary)
        await store.record_starts(self.con, self.tenant_id, r, starts)
        self.moved += len(starts)
        self.counted += sum(1 for s in starts if s.state == rules.APPLIED)
        if len(device_ids) == budget:
            if by_rate:
                self._wait_for_rate()
            else:
                self._check_by(self.now)

    def _wait_for_rate(self) -> None:
        r = self.rollout
        if r.max_per_minute:
            self._check_by(
                rules.next_tick_at(
                    max_per_minute=r.max_per_minute,
                    since=r.rate_since,
                    started_since=r.started_since + self.counted,
                )
            )

    async def _write(
        self, target: store.Target, device_ids: list[str], *, canary: bool
    ) -> list[store.Start]:
        """Write the patch to those of `device_ids` still in the target, as
        PatchDesired does: merged into the locked desired document, written
        on its version, all in one statement."""
        if not device_ids:
            return []
        r = self.rollout
        members = await store.in_target(
            self.con, self.tenant_id, target, device_ids, stale_after=self.stale_after
        )
        locked = await twin_store.lock_desired_many(self.con, self.tenant_id, sorted(members))
        starts: dict[str, store.Start] = {}
        writes: list[twin_store.DesiredWrite] = []
        for device_id in device_ids:
            current = locked.get(device_id)
            if device_id not in members:
                starts[device_id] = _skipped(device_id, canary, "left the target")
            elif current is None:
                starts[device_id] = _skipped(device_id, canary, "the device was deleted")
            elif current.lifecycle != "ACTIVE":
                starts[device_id] = _skipped(device_id, canary, "the device was decommissioned")
            elif rules.patch_holds(current.desired, r.patch):
                # Nothing to write: the device is judged on the version it has.
                starts[device_id] = store.Start(
                    device_id,
                    rules.APPLIED,
                    canary,
                    desired_version=current.desired_version,
                    detail="the desired state already held the patch",
                )
            else:
                merged = apply_merge_patch(current.desired, r.patch)
                assert isinstance(merged, dict)
                try:
                    documents.checked("desired", merged)
                except InvalidArgument as e:
                    starts[device_id] = store.Start(
                        device_id, rules.FAILED, canary, detail=_violations(e.violations)
                    )
                else:
                    writes.append(
                        twin_store.DesiredWrite(device_id, merged, current.desired_version)
                    )
        written = await twin_store.write_desired_many(self.con, self.tenant_id, writes)
        for w in writes:
            if w.device_id not in written:
                # Locked, so its version held: it was decommissioned meanwhile.
                starts[w.device_id] = _skipped(w.device_id, canary, "the device was decommissioned")
                continue
            version, revision = written[w.device_id]
            self.written.append((w.device_id, revision))
            starts[w.device_id] = store.Start(
                w.device_id, rules.APPLIED, canary, desired_version=version, revision=revision
            )
        return [starts[d] for d in device_ids]


def _skipped(device_id: str, canary: bool, detail: str) -> store.Start:
    return store.Start(device_id, rules.SKIPPED, canary, detail=detail)


def _violations(violations: list[FieldViolation]) -> str:
    return "the patched desired document: " + "; ".join(v.description for v in violations)


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
