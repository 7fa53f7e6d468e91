// The pure part of jobwire.js: events fold into frozen snapshots strictly in seq order.
import assert from "node:assert/strict";
import { test } from "node:test";

import { JobState, Offer, applyEvent, countsOf } from "../../src/jobwire/web/static/jobwire.js";
import { Log } from "./fakes.mjs";

function stateAt(log, seq = log.seq) {
  const s = new JobState(log.id);
  s.reset({ ...new Log(log.id, log.task).snapshot() }, []);
  for (const ev of log.events.slice(1, seq)) assert.equal(s.offer(ev), Offer.APPLIED);
  return s;
}

function running(n) {
  const log = new Log();
  log.start();
  log.declare(Array.from({ length: n }, (_, i) => `i${i}`));
  return log;
}

test("applies events in seq order and builds items from them", () => {
  const log = running(3);
  log.item("i0", "running");
  log.item("i0", "done", { k: 0 });
  log.item("i1", "failed");
  log.finish("completed", { ran: 2 });
  const view = stateAt(log).view;
  assert.equal(view.seq, 7);
  assert.equal(view.status, "completed");
  assert.deepEqual(view.progress, { total: 3, done: 1, failed: 1 });
  assert.deepEqual(view.items.map((i) => [i.ref, i.status]),
    [["i0", "done"], ["i1", "failed"], ["i2", "pending"]]);
  assert.deepEqual(view.items[0].result, { k: 0 });
  assert.deepEqual(view.result, { ran: 2 });
  assert.equal(view.finished_at, log.events.at(-1).at);
});

test("duplicates and old events are dropped without a change", () => {
  const log = running(2);
  log.item("i0", "done");
  const s = stateAt(log);
  const before = s.view;
  for (const ev of log.events) assert.equal(s.offer(ev), Offer.DUPLICATE);
  assert.equal(s.view, before, "no new snapshot for a dropped event");
});

test("another job's events are foreign, whatever their seq", () => {
  const mine = running(2);
  const other = new Log("j2");
  other.start();
  other.declare(["x"]);
  const s = stateAt(mine);
  for (const ev of other.events) assert.equal(s.offer(ev), Offer.FOREIGN);
  assert.equal(s.offer({ ...mine.events.at(-1), job: "j2", seq: mine.seq + 1 }), Offer.FOREIGN);
  assert.equal(s.seq, mine.seq);
});

test("a skipped seq is a gap: nothing applied, resync needed", () => {
  const log = running(3);
  log.item("i0", "done");
  log.item("i1", "done");
  const s = stateAt(log, log.seq - 1);
  const ahead = { ...log.events.at(-1), seq: log.seq + 1 };
  assert.equal(s.offer(ahead), Offer.GAP);
  assert.equal(s.seq, log.seq - 1);
  assert.equal(s.offer(log.events.at(-1)), Offer.APPLIED);
});

test("an event whose counts disagree with the items it implies is refused as a gap", () => {
  const log = running(2);
  const bad = log.item("i0", "done");
  bad.data.progress = { total: 2, done: 2, failed: 0 };
  const s = stateAt(log, log.seq - 1);
  assert.equal(s.offer(bad), Offer.GAP);
  assert.equal(s.view.progress.done, 0);
});

test("events before any base state are not applied", () => {
  const s = new JobState("j1");
  assert.equal(s.offer(new Log().events[0]), Offer.UNREADY);
  assert.equal(s.view, null);
});

test("a reset whose counts disagree with its items is rejected", () => {
  const s = new JobState("j1");
  const snap = { ...new Log().snapshot(), progress: { total: 2, done: 1, failed: 0 } };
  assert.throws(() => s.reset(snap, [{ ref: "a", status: "done" }]), /counts disagree/);
});

test("snapshots are deeply frozen and never change after they are handed out", () => {
  const log = running(2);
  log.item("i0", "done", { nested: { v: 1 } });
  const s = stateAt(log);
  const view = s.view;
  assert.ok(Object.isFrozen(view) && Object.isFrozen(view.progress));
  assert.ok(Object.isFrozen(view.items) && Object.isFrozen(view.items[0]));
  assert.ok(Object.isFrozen(view.items[0].result.nested));
  assert.throws(() => { view.progress.done = 9; }, TypeError);
  assert.throws(() => { view.items.push({}); }, TypeError);
  assert.equal(s.offer(log.item("i1", "done")), Offer.APPLIED);
  assert.equal(view.progress.done, 1, "an earlier snapshot keeps its values");
  assert.equal(view.items[1].status, "pending");
  assert.equal(s.view.progress.done, 2);
});

test("in every snapshot the counts agree with the item states (random logs)", () => {
  for (let run = 0; run < 50; run++) {
    const n = 1 + (run % 7);
    const log = running(n);
    const s = stateAt(log);
    const states = ["running", "done", "failed"];
    for (let step = 0; step < 3 * n; step++) {
      const ref = `i${Math.floor(Math.random() * n)}`;
      const cur = log.items.get(ref);
      if (cur === "done" || cur === "failed") continue;
      const next = cur === "running" ? states[1 + Math.floor(Math.random() * 2)] : "running";
      assert.equal(s.offer(log.item(ref, next)), Offer.APPLIED);
      const view = s.view;
      assert.deepEqual(countsOf(view.items), view.progress);
    }
  }
});

test("applyEvent mirrors the server: retrying resets items, cancel and info are kept", () => {
  const log = running(2);
  log.item("i0", "done");
  log.item("i1", "running");
  log.add("progress", { info: { stage: "x" } });
  log.add("cancel_requested");
  log.items.set("i1", "pending");
  log.status = "queued";
  log.add("retrying", { error: "worker lost", attempt: 1, reset: ["i1"] });
  const view = stateAt(log).view;
  assert.deepEqual(view.info, { stage: "x" });
  assert.equal(view.cancel_requested, true);
  assert.equal(view.error, "worker lost");
  assert.equal(view.status, "queued");
  assert.deepEqual(view.items.map((i) => i.status), ["done", "pending"]);
});

test("applyEvent returns copies and leaves its inputs alone", () => {
  const log = running(1);
  const snap = log.snapshot();
  const items = new Map([["i0", { ref: "i0", status: "pending", result: null, error: null }]]);
  const ev = log.item("i0", "done");
  const out = applyEvent(snap, items, ev);
  assert.equal(items.get("i0").status, "pending");
  assert.equal(snap.progress.done, 0);
  assert.equal(out.items.get("i0").status, "done");
  assert.equal(out.snapshot.seq, ev.seq);
});
