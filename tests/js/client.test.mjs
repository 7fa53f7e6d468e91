// The client of jobwire.js over a scripted socket and fetch: subscriptions, ordering,
// resync, reconnect, the long-poll fallback and recovery.
import assert from "node:assert/strict";
import { afterEach, beforeEach, test } from "node:test";

import { createClient } from "../../src/jobwire/web/static/jobwire.js";
import { FakeSocket, Log, fakeFetch, tick, until } from "./fakes.mjs";

let client;

// GET /events: what the log holds after `after`; an empty answer comes after a pause,
// as a long-poll's would. Tracks how many polls are in flight at once.
function eventsRoute(log) {
  const route = async (path) => {
    const after = Number(new URL(path, "http://x").searchParams.get("after"));
    const events = log.events.filter((e) => e.seq > after);
    route.inflight += 1;
    route.maxInflight = Math.max(route.maxInflight, route.inflight);
    if (!events.length) await tick(2);
    route.inflight -= 1;
    return [200, { job: log.id, events }];
  };
  route.inflight = route.maxInflight = 0;
  return route;
}

function setup(log, extraRoutes = {}, options = {}) {
  const fetch = fakeFetch({
    [`/api/jobs/${log.id}/items`]: () => [200, log.itemsBody()],
    [`/api/jobs/${log.id}/events`]: eventsRoute(log),
    [`/api/jobs/${log.id}`]: () => [200, log.snapshot()],
    ...extraRoutes,
  });
  client = createClient({
    url: "http://jw.test", WebSocket: FakeSocket, fetch, backoffMs: 1, maxBackoffMs: 4,
    stableMs: 5, pollWait: 0, ...options,
  });
  return fetch;
}

function recorder() {
  const seen = [];
  const fn = (snap) => seen.push(snap);
  fn.seen = seen;
  fn.seqs = () => seen.map((s) => s.seq);
  return fn;
}

beforeEach(() => FakeSocket.reset());
afterEach(() => client?.close());

function running(n) {
  const log = new Log();
  log.start();
  log.declare(Array.from({ length: n }, (_, i) => `i${i}`));
  return log;
}

// Watch `log`'s job with one recorder, and wait until the socket has asked to subscribe.
async function watchOne(log) {
  const w = recorder();
  const stop = client.watch(log.id, w);
  const ws = FakeSocket.last;
  ws.open();
  await until(() => ws.ops("subscribe").length === 1, "subscribe");
  return { w, ws, stop };
}

test("many watchers of one job share one subscription and see the same snapshots", async () => {
  const log = running(2);
  setup(log);
  const watchers = Array.from({ length: 5 }, recorder);
  const stops = watchers.map((w) => client.watch(log.id, w));
  const ws = FakeSocket.last;
  ws.open();
  await until(() => ws.ops("subscribe").length === 1, "subscribe");
  assert.equal(FakeSocket.all.length, 1, "one socket per client");
  assert.deepEqual(ws.ops("subscribe"), [{ op: "subscribe", job: log.id, after: log.seq }]);
  ws.message({ op: "subscribed", job: log.id, after: log.seq });
  ws.message(log.item("i0", "done"));
  for (const w of watchers) assert.deepEqual(w.seqs(), [3, 4]);
  stops.slice(1).forEach((stop) => stop());
  assert.equal(ws.ops("unsubscribe").length, 0, "one watcher left");
  stops[0]();
  assert.deepEqual(ws.ops("unsubscribe"), [{ op: "unsubscribe", job: log.id }]);
});

test("duplicate, old and foreign messages never reach a watcher", async () => {
  const log = running(3);
  setup(log);
  const { w, ws } = await watchOne(log);
  ws.message({ op: "subscribed", job: log.id, after: log.seq });
  const e4 = log.item("i0", "done");
  ws.message(e4);
  ws.message(e4);
  ws.message(log.events[1]);
  const other = new Log("other");
  ws.message({ ...other.events[0], seq: 5 });
  ws.message(log.item("i1", "done"));
  assert.deepEqual(w.seqs(), [3, 4, 5]);
  assert.ok(w.seen.every((s) => s.id === log.id));
});

test("a frame of several events (the server coalesces them) is applied in order", async () => {
  const log = running(2);
  setup(log);
  const { w, ws } = await watchOne(log);
  ws.message({ op: "subscribed", job: log.id, after: log.seq });
  const e4 = log.item("i0", "done");
  const other = new Log("other");
  ws.message([e4, e4, { ...other.events[0], seq: 5 }, log.item("i1", "done"), log.finish()]);
  assert.deepEqual(w.seqs(), [3, 4, 5, 6]);
  assert.equal(w.seen.at(-1).status, "completed");
  assert.equal(ws.ops("unsubscribe").length, 0, "the server drops ended jobs itself");
});

test("a gap makes the client resync from REST at one seq, then resubscribe after it", async () => {
  const log = running(4);
  const fetch = setup(log);
  const { w, ws } = await watchOne(log);
  ws.message({ op: "subscribed", job: log.id, after: 3 });
  log.item("i0", "done");
  log.item("i1", "done");
  const e6 = log.item("i2", "failed");
  const before = fetch.calls.length;
  ws.message(e6); // 4 and 5 never arrived
  await until(() => ws.ops("subscribe").length === 2, "resubscribe");
  const paths = fetch.calls.slice(before).map((c) => c.path);
  assert.ok(paths.includes(`/api/jobs/${log.id}`) && paths.includes(`/api/jobs/${log.id}/items`));
  assert.deepEqual(ws.ops("subscribe")[1], { op: "subscribe", job: log.id, after: 6 });
  const last = w.seen.at(-1);
  assert.equal(last.seq, 6);
  assert.deepEqual(last.progress, { total: 4, done: 2, failed: 1 });
  assert.deepEqual(last.items.map((i) => i.status), ["done", "done", "failed", "pending"]);
  // Events of the replaced subscription are ignored until the new one is confirmed.
  ws.message(log.item("i3", "done"));
  assert.equal(w.seen.at(-1).seq, 6);
  ws.message({ op: "subscribed", job: log.id, after: 6 });
  ws.message(log.events.at(-1));
  assert.deepEqual(w.seen.at(-1).progress, { total: 4, done: 3, failed: 1 });
});

test("a resync that reads items at a later seq than the job folds the job forward to it", async () => {
  const log = running(2);
  let jobReads = 0;
  const stale = log.snapshot();
  setup(log, {
    // The job is read at seq 3; two items change before the items are read.
    [`/api/jobs/${log.id}`]: () => [200, jobReads++ === 0 ? stale : log.snapshot()],
    [`/api/jobs/${log.id}/items`]: () => {
      log.item("i0", "done");
      log.item("i1", "running");
      return [200, log.itemsBody()];
    },
  });
  const w = recorder();
  client.watch(log.id, w);
  await until(() => w.seen.length === 1, "first snapshot");
  const [first] = w.seen;
  assert.equal(first.seq, 5);
  assert.deepEqual(first.progress, { total: 2, done: 1, failed: 0 });
  assert.deepEqual(first.items.map((i) => i.status), ["done", "running"]);
});

test("the terminal event ends the subscription without the client asking", async () => {
  const log = running(1);
  setup(log);
  const { w, ws, stop } = await watchOne(log);
  ws.message({ op: "subscribed", job: log.id, after: 3 });
  ws.message(log.item("i0", "done"));
  ws.message(log.finish());
  assert.equal(w.seen.at(-1).status, "completed");
  stop();
  assert.equal(ws.ops("unsubscribe").length, 0, "the server already dropped it");
  const late = recorder();
  client.watch(log.id, late);
  await until(() => late.seen.length === 1, "a new watcher's snapshot");
  assert.equal(ws.ops("subscribe").length, 1, "a finished job needs no subscription");
});

test("after a drop the socket reconnects and resumes after the last seq it applied", async () => {
  const log = running(3);
  setup(log);
  const w = recorder();
  client.watch(log.id, w);
  const states = [];
  client.onState((s) => states.push(s));
  FakeSocket.last.open();
  await until(() => FakeSocket.last.ops("subscribe").length === 1, "subscribe");
  FakeSocket.last.message({ op: "subscribed", job: log.id, after: 3 });
  FakeSocket.last.message(log.item("i0", "done"));
  FakeSocket.last.drop();
  assert.equal(client.state, "reconnecting");
  await until(() => FakeSocket.all.length === 2, "a new socket");
  FakeSocket.last.open();
  await until(() => FakeSocket.last.ops("subscribe").length === 1, "resubscribe");
  assert.deepEqual(FakeSocket.last.ops("subscribe")[0], { op: "subscribe", job: log.id, after: 4 });
  FakeSocket.last.message({ op: "subscribed", job: log.id, after: 4 });
  assert.equal(client.state, "live");
  FakeSocket.last.message(log.item("i1", "done"));
  assert.deepEqual(w.seqs(), [3, 4, 5]);
  assert.deepEqual(states, ["connecting", "live", "reconnecting", "live"]);
});

test("when the socket keeps failing, one long-poller per job carries the events", async () => {
  const log = running(3);
  const polls = eventsRoute(log);
  const fetch = setup(log, { [`/api/jobs/${log.id}/events`]: polls });
  const a = recorder();
  const b = recorder();
  client.watch(log.id, a);
  client.watch(log.id, b);
  await until(() => a.seen.length === 1, "first snapshot");
  FakeSocket.last.drop(); // never opened
  await until(() => FakeSocket.all.length === 2, "retry");
  FakeSocket.last.drop();
  assert.equal(client.state, "polling");
  log.item("i0", "done");
  log.item("i1", "done");
  await until(() => a.seen.at(-1).seq === 5, "polled events");
  await tick(10);
  assert.equal(polls.maxInflight, 1, "one poller for the job, however many watch it");
  assert.deepEqual(b.seqs(), a.seqs());
  assert.deepEqual(a.seqs(), [3, 4, 5]);

  // The socket works again: once it confirms the job, the poller stands down.
  await until(() => FakeSocket.last.readyState === 0, "reconnect attempt");
  FakeSocket.last.open();
  await until(() => FakeSocket.last.ops("subscribe").length === 1, "subscribe");
  assert.deepEqual(FakeSocket.last.ops("subscribe")[0], { op: "subscribe", job: log.id, after: 5 });
  FakeSocket.last.message({ op: "subscribed", job: log.id, after: 5 });
  assert.equal(client.state, "live");
  await tick(10);
  const pollsBefore = fetch.calls.filter((c) => c.path.includes("/events?")).length;
  await tick(20);
  assert.equal(fetch.calls.filter((c) => c.path.includes("/events?")).length, pollsBefore);
  FakeSocket.last.message(log.finish());
  assert.equal(a.seen.at(-1).status, "completed");
  assert.deepEqual(a.seqs(), [3, 4, 5, 6]);
});

test("recover() is single-flight and returns the active jobs", async () => {
  const log = running(1);
  let release;
  const gate = new Promise((r) => { release = r; });
  const fetch = setup(log, {
    "/api/jobs?status=active": async () => { await gate; return [200, [log.snapshot()]]; },
  });
  const calls = [client.recover(), client.recover(), client.recover()];
  release();
  const results = await Promise.all(calls);
  assert.equal(fetch.calls.filter((c) => c.path === "/api/jobs?status=active").length, 1);
  assert.ok(results.every((r) => r === results[0]));
  assert.equal(results[0][0].id, log.id);
  assert.ok(Object.isFrozen(results[0][0]));
  await client.recover();
  assert.equal(fetch.calls.filter((c) => c.path === "/api/jobs?status=active").length, 2,
    "a later call asks again");
});

test("a submitted job starts from its own seq 1 without a REST read", async () => {
  const log = new Log();
  const fetch = setup(log, {
    "/api/jobs": (_, init) => init.method === "POST" ? [201, { created: true, job: log.snapshot() }]
      : [405, {}],
  });
  const { job, created } = await client.submit("steps", { n: 1 });
  assert.equal(created, true);
  const w = recorder();
  client.watch(job.id, w);
  await until(() => w.seen.length === 1, "first snapshot");
  assert.equal(w.seen[0].seq, 1);
  assert.deepEqual(w.seen[0].progress, { total: 0, done: 0, failed: 0 });
  assert.equal(fetch.calls.filter((c) => c.method === "GET").length, 0);
});

test("a token goes in headers and the socket's first message, never in a URL", async () => {
  const log = running(1);
  const seen = [];
  const fetch = setup(log, {}, { token: "t0k", fallbackAfter: 1 });
  const inner = client._fetch;
  client._fetch = (url, init) => { seen.push(init.headers.authorization); return inner(url, init); };
  client.watch(log.id, () => {});
  await until(() => seen.length >= 2, "REST reads");
  for (const round of [1, 2]) { // the first socket, then the one that replaces it
    const ws = FakeSocket.last;
    assert.equal(ws.url, "ws://jw.test/api/ws?auth=message");
    ws.open();
    await until(() => ws.ops("subscribe").length === 1, `subscribe (socket ${round})`);
    // The server must read the auth op before anything else on the socket.
    assert.deepEqual(ws.sent[0], { op: "auth", token: "t0k" });
    assert.equal(ws.ops("auth").length, 1);
    ws.drop(); // with fallbackAfter 1 the job is long-polled meanwhile
    await until(() => FakeSocket.all.length === round + 1, "a new socket");
  }
  await until(() => fetch.calls.some((c) => c.path.includes("wait=")), "a long-poll");
  assert.ok(seen.every((h) => h === "Bearer t0k"));
  for (const c of fetch.calls) assert.ok(!c.path.includes("t0k"), c.path);
  for (const ws of FakeSocket.all) assert.ok(!ws.url.includes("t0k"), ws.url);
});

test("a job that is gone (404) is reported to its watchers", async () => {
  const log = running(1);
  setup(log, { [`/api/jobs/${log.id}`]: () => [404, { detail: "job not found" }] });
  const errors = [];
  client.watch(log.id, () => assert.fail("no snapshot"), { onError: (e) => errors.push(e) });
  await until(() => errors.length === 1, "error");
  assert.equal(errors[0].status, 404);
});

test("createClient() hands every caller in a page the same client until it is closed", () => {
  const a = createClient({ url: "http://jw.test" });
  assert.equal(createClient({ url: "http://jw.test/" }), a);
  const other = createClient({ url: "http://jw.test", token: "other" });
  assert.notEqual(other, a);
  other.close();
  a.close();
  client = createClient({ url: "http://jw.test" });
  assert.notEqual(client, a);
});

test("a watcher that arrives after the job is gone hears so too", async () => {
  const log = running(1);
  setup(log, { [`/api/jobs/${log.id}`]: () => [404, { detail: "job not found" }] });
  const first = [];
  client.watch(log.id, () => {}, { onError: (e) => first.push(e) });
  await until(() => first.length === 1, "first error");
  const late = [];
  client.watch(log.id, () => assert.fail("no snapshot"), { onError: (e) => late.push(e) });
  await until(() => late.length === 1, "late error");
  assert.equal(late[0].status, 404);
});

test("a subscription the server refuses is long-polled instead, not retried in a loop", async () => {
  const log = running(2);
  const fetch = setup(log);
  const { w, ws } = await watchOne(log);
  ws.message({ op: "error", job: log.id, code: 429, error: "at most 1000 subscriptions" });
  log.item("i0", "done");
  await until(() => w.seen.at(-1).seq === 4, "polled event");
  assert.equal(ws.ops("subscribe").length, 1);
  assert.ok(fetch.calls.some((c) => c.path.startsWith(`/api/jobs/${log.id}/events?after=3`)));
});

// A token function as identity SDKs have (getToken): each call returns the next token,
// after a pause, so concurrent callers really overlap.
function tokens() {
  const fn = async () => { await tick(2); fn.calls += 1; return `t${fn.calls}`; };
  fn.calls = 0;
  return fn;
}

const authOf = (init) => init.headers.authorization;

test("a token function is asked before every socket, whose first message carries it", async () => {
  const log = running(1);
  const getToken = tokens();
  const fetch = setup(log, {}, { token: getToken });
  client.watch(log.id, () => {});
  for (const round of [1, 2]) {
    await until(() => FakeSocket.all.length === round, `socket ${round}`);
    const ws = FakeSocket.last;
    assert.equal(ws.url, "ws://jw.test/api/ws?auth=message");
    ws.open();
    await until(() => ws.ops("subscribe").length === 1, `subscribe (socket ${round})`);
    assert.deepEqual(ws.sent[0], { op: "auth", token: `t${round}` });
    ws.drop();
  }
  assert.equal(getToken.calls, 2, "the first socket and the REST reads shared one call");
  for (const c of fetch.calls) assert.ok(!/t\d/.test(c.path), c.path);
});

test("after a 4401 the client gets a fresh token and resubscribes from its seq", async () => {
  const log = running(3);
  const getToken = tokens();
  setup(log, {}, { token: getToken });
  const errors = [];
  const w = recorder();
  client.watch(log.id, w, { onError: (e) => errors.push(e) });
  await until(() => FakeSocket.all.length === 1, "socket");
  FakeSocket.last.open();
  await until(() => FakeSocket.last.ops("subscribe").length === 1, "subscribe");
  FakeSocket.last.message({ op: "subscribed", job: log.id, after: 3 });
  FakeSocket.last.message(log.item("i0", "done"));
  FakeSocket.last.drop(4401, "token expired: reconnect with a fresh token");
  await until(() => FakeSocket.all.length === 2, "a new socket");
  const ws = FakeSocket.last;
  ws.open();
  await until(() => ws.ops("subscribe").length === 1, "resubscribe");
  assert.deepEqual(ws.sent[0], { op: "auth", token: "t2" });
  assert.deepEqual(ws.ops("subscribe")[0], { op: "subscribe", job: log.id, after: 4 });
  ws.message({ op: "subscribed", job: log.id, after: 4 });
  ws.message(log.item("i1", "done"));
  ws.message(log.item("i2", "done"));
  assert.deepEqual(w.seqs(), [3, 4, 5, 6]);
  assert.deepEqual(errors, []);
});

test("a REST 401 asks for one fresh token and retries with it", async () => {
  const log = running(1);
  const getToken = tokens();
  const fetch = setup(log, {
    [`/api/jobs/${log.id}`]: (_, init) => authOf(init) === "Bearer t2"
      ? [200, log.snapshot()] : [401, { detail: "token expired" }],
  }, { token: getToken });
  const job = await client.job(log.id);
  assert.equal(job.id, log.id);
  assert.equal(getToken.calls, 2);
  assert.equal(fetch.calls.length, 2);
});

test("concurrent 401s share one token refresh", async () => {
  const log = running(1);
  const getToken = tokens();
  const fetch = setup(log, {
    [`/api/jobs/${log.id}`]: async (_, init) => {
      await tick(2); // both requests are refused while neither has refreshed yet
      return authOf(init) === "Bearer t2" ? [200, log.snapshot()] : [401, { detail: "expired" }];
    },
  }, { token: getToken });
  const jobs = await Promise.all([client.job(log.id), client.job(log.id), client.job(log.id)]);
  assert.ok(jobs.every((j) => j.id === log.id));
  assert.equal(getToken.calls, 2, "one call for the first token, one for the refresh");
  assert.equal(fetch.calls.length, 6);
});

test("a fresh token refused too ends in the 401, without a loop", async () => {
  const log = running(2);
  const getToken = tokens();
  const fetch = setup(log, {
    "/api/jobs/nope": () => [401, { detail: "token signature invalid" }],
  }, { token: getToken });
  await assert.rejects(client.job("nope"), (e) => e.status === 401);
  assert.equal(getToken.calls, 2);
  assert.equal(fetch.calls.filter((c) => c.path === "/api/jobs/nope").length, 2);

  // The socket: closed 4401, reconnected with a fresh token, refused again at once.
  const errors = [];
  client.watch(log.id, () => {}, { onError: (e) => errors.push(e) });
  await until(() => FakeSocket.all.length === 1, "socket");
  FakeSocket.last.open();
  await until(() => FakeSocket.last.ops("subscribe").length === 1, "subscribe");
  FakeSocket.last.message({ op: "subscribed", job: log.id, after: 3 });
  FakeSocket.last.drop(4401, "token expired: reconnect with a fresh token");
  await until(() => FakeSocket.all.length === 2, "a new socket");
  FakeSocket.last.open();
  FakeSocket.last.drop(4401, "token signature invalid");
  await until(() => errors.length === 1, "the watcher hears the 401");
  assert.equal(errors[0].status, 401);
  await tick(30);
  assert.equal(FakeSocket.all.length, 2, "no reconnect loop");
  assert.equal(client.state, "idle");
});
