// The owner feed in jobwire.js: folding `jobs` messages into a list, one server feed for
// any number of listeners, and resuming from the cursor after a reconnect.
import assert from "node:assert/strict";
import { afterEach, beforeEach, test } from "node:test";

import { createClient, foldJobs, listJobs } from "../../src/jobwire/web/static/jobwire.js";
import { FakeSocket, fakeFetch, tick, until } from "./fakes.mjs";

const job = (id, status, created) => ({ id, status, created_at: `2026-01-01T00:00:0${created}Z` });
const ids = (list) => list.map((j) => j.id);

test("changes fold into the list: put back, dropped, or cleared by a reset", () => {
  let jobs = foldJobs(new Map(), {
    reset: true, cursor: 3, changes: [{ id: "a", job: job("a", "queued", 1) },
      { id: "b", job: job("b", "running", 2) }, { id: "c", job: job("c", "completed", 3) }],
  });
  assert.deepEqual(ids(listJobs(jobs)), ["c", "b", "a"], "newest first");
  assert.deepEqual(ids(listJobs(jobs, "active")), ["b", "a"]);
  jobs = foldJobs(jobs, {
    reset: false, cursor: 5, changes: [{ id: "c", job: null }, { id: "a", job: job("a", "failed", 1) }],
  });
  assert.deepEqual(ids(listJobs(jobs)), ["b", "a"], "c deleted, a kept with its new status");
  assert.deepEqual(ids(listJobs(jobs, "active")), ["b"], "a ended: out of the active list");
  assert.deepEqual(ids(listJobs(foldJobs(jobs, { reset: true, cursor: 6, changes: [] }))), []);
  const list = listJobs(jobs);
  assert.ok(Object.isFrozen(list) && Object.isFrozen(list[0]), "frozen for every listener");
});

let client;
beforeEach(() => FakeSocket.reset());
afterEach(() => client?.close());

test("one server feed for every listener, resumed from the cursor after a reconnect", async () => {
  client = createClient({ url: "http://jw.test", WebSocket: FakeSocket, fetch: fakeFetch({}),
    backoffMs: 1, maxBackoffMs: 2, stableMs: 1 });
  const active = [];
  const all = [];
  const stopActive = client.jobs({ status: "active" }, (list) => active.push(ids(list)));
  const stopAll = client.jobs({}, (list) => all.push(ids(list)));
  const first = FakeSocket.last;
  first.open();
  assert.deepEqual(first.ops("watch_jobs"), [{ op: "watch_jobs", status: null, after: 0 }]);
  first.message({ op: "jobs", reset: true, cursor: 2, changes: [
    { id: "a", job: job("a", "running", 1) }, { id: "b", job: job("b", "completed", 2) }] });
  assert.deepEqual(active.at(-1), ["a"]);
  assert.deepEqual(all.at(-1), ["b", "a"]);

  first.drop();
  await until(() => FakeSocket.all.length === 2, "a new socket");
  FakeSocket.last.open();
  assert.deepEqual(FakeSocket.last.ops("watch_jobs"), [{ op: "watch_jobs", status: null, after: 2 }]);
  FakeSocket.last.message({ op: "jobs", reset: false, cursor: 4, changes: [
    { id: "b", job: null }, { id: "c", job: job("c", "queued", 3) }] });
  assert.deepEqual(all.at(-1), ["c", "a"]);
  assert.deepEqual(active.at(-1), ["c", "a"]);

  stopActive();
  assert.deepEqual(FakeSocket.last.ops("unwatch_jobs"), [], "a listener is left");
  const late = [];
  const stopLate = client.jobs({ status: "queued" }, (list) => late.push(ids(list)));
  await tick();
  assert.deepEqual(late, [["c"]], "a new listener gets the list at once, from the client");
  assert.equal(FakeSocket.last.ops("watch_jobs").length, 1, "and no second server feed");
  stopLate();
  stopAll();
  assert.deepEqual(FakeSocket.last.ops("unwatch_jobs"), [{ op: "unwatch_jobs" }]);
});
