// Test doubles for jobwire.js under Node: a scripted WebSocket and a scripted fetch.

/** A WebSocket the test opens, feeds and drops by hand. */
export class FakeSocket {
  static all = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
  }

  static get last() {
    return FakeSocket.all.at(-1);
  }

  static reset() {
    FakeSocket.all = [];
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close() {
    this.drop();
  }

  open() {
    this.readyState = 1;
    this.onopen?.();
  }

  message(obj) {
    this.onmessage?.({ data: JSON.stringify(obj) });
  }

  drop(code = 1006, reason = "") {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  ops(op) {
    return this.sent.filter((m) => m.op === op);
  }
}

/** A fetch answering from `routes` (path prefix -> handler(url, init)); records every call. */
export function fakeFetch(routes) {
  const calls = [];
  const fn = async (url, init = {}) => {
    const path = new URL(url).pathname + new URL(url).search;
    calls.push({ path, method: init.method ?? "GET" });
    const match = Object.keys(routes)
      .filter((prefix) => path.startsWith(prefix))
      .sort((a, b) => b.length - a.length)[0];
    if (!match) return response(404, { detail: "not found" });
    const [status, body] = await routes[match](path, init);
    return response(status, body);
  };
  fn.calls = calls;
  return fn;
}

function response(status, body) {
  return {
    status, ok: status >= 200 && status < 300,
    text: async () => (body === undefined ? "" : JSON.stringify(body)),
  };
}

/** Builds a job's event log the way the server does: every event states status and counts. */
export class Log {
  constructor(id = "j1", task = "steps") {
    this.id = id;
    this.task = task;
    this.events = [];
    this.items = new Map();
    this.status = "queued";
    this.add("created", { task, key: null });
  }

  get seq() {
    return this.events.length;
  }

  counts() {
    const s = [...this.items.values()];
    return {
      total: s.length, done: s.filter((x) => x === "done").length,
      failed: s.filter((x) => x === "failed").length,
    };
  }

  add(type, extra = {}) {
    const ev = {
      job: this.id, seq: this.seq + 1, type, at: `2026-01-01T00:00:${String(this.seq).padStart(2, "0")}Z`,
      data: { status: this.status, progress: this.counts(), ...extra },
    };
    this.events.push(ev);
    return ev;
  }

  start() {
    this.status = "running";
    return this.add("started", { attempt: 1 });
  }

  declare(refs) {
    refs.forEach((r) => this.items.set(r, "pending"));
    return this.add("items", { refs });
  }

  item(ref, state, result) {
    this.items.set(ref, state);
    return this.add("item", { ref, item: state, ...(result === undefined ? {} : { result }) });
  }

  finish(status = "completed", result = { ok: true }) {
    this.status = status;
    return this.add(status, { result, error: null });
  }

  /** The REST snapshot at the log's current seq. */
  snapshot() {
    return {
      id: this.id, task: this.task, key: null, owner: "guest:t", status: this.status,
      progress: this.counts(), result: null, error: null, info: null, attempt: 1,
      cancel_requested: false, seq: this.seq, created_at: "2026-01-01T00:00:00Z",
      updated_at: "2026-01-01T00:00:00Z", finished_at: null,
    };
  }

  itemsBody() {
    return {
      job: this.id, seq: this.seq,
      items: [...this.items].map(([ref, status]) => ({ ref, status, result: null, error: null })),
    };
  }
}

export const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

/** Wait until `predicate()` holds (the client works through promises and timers). */
export async function until(predicate, what = "condition", ms = 2000) {
  const end = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await tick(1);
  }
}
