// jobwire.js: live, ordered, resumable job progress for web pages. Dependency-free ES module.
//
// The pure part (applyEvent, JobState) folds a job's events into snapshots exactly as
// jobwire/model.py does and imports in Node without a DOM. The Client part adds the
// transport: one WebSocket per page, one server subscription per job, resync on gaps,
// reconnect with backoff, and a long-poll fallback.

export const TERMINAL = Object.freeze(["completed", "failed", "cancelled"]);
const TERMINAL_EVENTS = new Set(TERMINAL);

export function isTerminal(status) {
  return TERMINAL_EVENTS.has(status);
}

/** Freeze an object and everything reachable from it, so no callback can edit shared state. */
export function deepFreeze(value) {
  if (value !== null && typeof value === "object" && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const key of Object.keys(value)) deepFreeze(value[key]);
  }
  return value;
}

function pendingItem(ref) {
  return { ref, status: "pending", result: null, error: null };
}

/**
 * Fold one event (wire form) into a job snapshot and its items (a Map ref -> item),
 * returning new copies. Mirrors jobwire.model.apply_event line for line; the caller
 * guarantees event.seq === snapshot.seq + 1.
 */
export function applyEvent(snapshot, items, event) {
  const data = event.data;
  const snap = { ...snapshot };
  const next = new Map(items);
  snap.seq = event.seq;
  snap.status = data.status;
  snap.progress = { ...data.progress };
  if (event.at) snap.updated_at = event.at;
  switch (event.type) {
    case "created":
      for (const [k, v] of Object.entries(data)) {
        if (k in snap || k === "id") snap[k] = v;
      }
      snap.progress = { ...data.progress };
      break;
    case "started":
      snap.attempt = data.attempt;
      break;
    case "items":
      for (const ref of data.refs) if (!next.has(ref)) next.set(ref, pendingItem(ref));
      break;
    case "item":
      next.set(data.ref, {
        ref: data.ref, status: data.item, result: data.result ?? null, error: data.error ?? null,
      });
      break;
    case "progress":
      snap.info = data.info ?? null;
      break;
    case "cancel_requested":
      snap.cancel_requested = true;
      break;
    case "retrying":
      // The attempts that count: one fewer when a stopping worker handed the job back.
      snap.attempt = data.attempt;
      snap.error = data.error ?? null;
      snap.run_at = data.run_at ?? null;
      break;
    default:
      if (TERMINAL_EVENTS.has(event.type)) {
        snap.result = data.result ?? null;
        snap.error = data.error ?? null;
        snap.finished_at = event.at ?? null;
      }
  }
  // Items a stopped attempt left running never finished: they are pending again.
  for (const ref of data.reset ?? []) {
    if (next.has(ref)) next.set(ref, { ...next.get(ref), status: "pending" });
  }
  return { snapshot: snap, items: next };
}

/** Aggregate counts as the item states say they are. */
export function countsOf(items) {
  let total = 0, done = 0, failed = 0;
  for (const it of items) {
    total += 1;
    if (it.status === "done") done += 1;
    else if (it.status === "failed") failed += 1;
  }
  return { total, done, failed };
}

function sameCounts(a, b) {
  return a.total === b.total && a.done === b.done && a.failed === b.failed;
}

/** What JobState.offer did with an event. */
export const Offer = Object.freeze({
  APPLIED: "applied",
  DUPLICATE: "duplicate", // seq at or below what we have: already applied
  FOREIGN: "foreign", // another job's event
  GAP: "gap", // seq skips ahead, or the counts stopped agreeing: resync needed
  UNREADY: "unready", // no base state yet (a resync is under way)
});

/**
 * One job's state on the client: a snapshot plus items at one seq, advanced only by the
 * next event in sequence. Views handed out are deeply frozen, and in every view the
 * job's counts equal what its items say.
 */
export class JobState {
  constructor(id) {
    this.id = id;
    this.snapshot = null;
    this.items = new Map();
    this._view = null;
  }

  get ready() {
    return this.snapshot !== null;
  }

  get seq() {
    return this.snapshot ? this.snapshot.seq : 0;
  }

  get terminal() {
    return this.ready && isTerminal(this.snapshot.status);
  }

  /** Start over from a snapshot and its item list read at the same seq. */
  reset(snapshot, itemList) {
    if (snapshot.id !== this.id) throw new Error(`snapshot of ${snapshot.id}, not ${this.id}`);
    const items = new Map(itemList.map((it) => [it.ref, { ...it }]));
    if (!sameCounts(countsOf(items.values()), snapshot.progress)) {
      throw new Error(`job ${this.id}: counts disagree with items at seq ${snapshot.seq}`);
    }
    this.snapshot = { ...snapshot, progress: { ...snapshot.progress } };
    this.items = items;
    this._view = null;
  }

  /** Apply `event` if it is this job's next one; otherwise say why not. */
  offer(event) {
    if (!event || event.job !== this.id) return Offer.FOREIGN;
    if (!this.ready) return Offer.UNREADY;
    if (event.seq <= this.seq) return Offer.DUPLICATE;
    if (event.seq !== this.seq + 1) return Offer.GAP;
    const { snapshot, items } = applyEvent(this.snapshot, this.items, event);
    // Guard the invariant on the refs this event touched (cheap), and on totals.
    if (!sameCounts(countsAfter(this, items, event), snapshot.progress)) return Offer.GAP;
    this.snapshot = snapshot;
    this.items = items;
    this._view = null;
    return Offer.APPLIED;
  }

  /** The current state as one deeply frozen object: the job's fields plus `items`. */
  get view() {
    if (!this.ready) return null;
    if (this._view === null) {
      this._view = deepFreeze({ ...this.snapshot, items: [...this.items.values()] });
    }
    return this._view;
  }
}

// Counts of `items` computed from the previous counts plus the refs `event` touched,
// so a 5,000-item job does not recount every item on every event.
function countsAfter(state, items, event) {
  const before = state.snapshot.progress;
  const d = event.data;
  const refs = event.type === "item" ? [d.ref] : (d.reset ?? []);
  let { done, failed } = before;
  for (const ref of refs) {
    const old = state.items.get(ref)?.status;
    const now = items.get(ref)?.status;
    done += (now === "done") - (old === "done");
    failed += (now === "failed") - (old === "failed");
  }
  return { total: items.size, done, failed };
}

// ---------------------------------------------------------------------------------------
// The client: transport, subscriptions, recovery.

export const ConnectionState = Object.freeze({
  IDLE: "idle", // no socket needed yet
  CONNECTING: "connecting",
  LIVE: "live",
  RECONNECTING: "reconnecting",
  POLLING: "polling",
});

// Where a validation error's `loc` starts: the part of the request, not a field name.
const LOC_PARTS = new Set(["body", "query", "path", "header"]);

/** The invalid fields a 422 body names, as [{field, message}] ("input.tracks", "…"). */
export function fieldErrors(body) {
  if (!Array.isArray(body?.detail)) return [];
  return body.detail.map((d) => {
    const loc = Array.isArray(d?.loc) ? d.loc : [];
    const path = LOC_PARTS.has(loc[0]) ? loc.slice(1) : loc;
    const field = path.map((p, i) => (typeof p === "number" ? `[${p}]` : `${i ? "." : ""}${p}`))
      .join("");
    return { field, message: String(d?.msg ?? "is not valid") };
  });
}

/**
 * A non-2xx answer. `message` is what a person can read ("input.tracks: List should have
 * at least 1 item…", or the server's `detail`); `status`, the parsed `body` and
 * `fields` (the invalid fields of a 422) are there to handle it.
 */
export class HttpError extends Error {
  constructor(status, body) {
    const fields = fieldErrors(body);
    const detail = typeof body === "string" ? body : body?.detail;
    super(fields.length ? fields.map((f) => (f.field ? `${f.field}: ${f.message}` : f.message))
      .join("; ")
      : typeof detail === "string" && detail ? detail.slice(0, 500) : `HTTP ${status}`);
    this.name = "HttpError";
    this.status = status;
    this.body = body;
    this.fields = fields;
  }
}

const ACTIVE = new Set(["queued", "running"]);

/**
 * Fold one `jobs` message of the owner feed into a Map id -> job, returning a new Map:
 * `reset` starts from nothing; each change drops its id, then puts its job back unless null.
 */
export function foldJobs(jobs, message) {
  const next = message.reset ? new Map() : new Map(jobs);
  for (const { id, job } of message.changes) {
    next.delete(id);
    if (job) next.set(id, deepFreeze(job));
  }
  return next;
}

/** The jobs of the Map with `status` ("active", a status, or none), ordered as
 * GET /api/jobs lists them (newest first), as a frozen array. */
export function listJobs(jobs, status) {
  const wanted = status === "active" ? (s) => ACTIVE.has(s) : (s) => !status || s === status;
  const newestFirst = (a, b) => {
    const [x, y] = a.created_at === b.created_at ? [a.id, b.id] : [a.created_at, b.created_at];
    return x < y ? 1 : -1;
  };
  return Object.freeze([...jobs.values()].filter((j) => wanted(j.status)).sort(newestFirst));
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
});

/**
 * The server's address every call is built on, absolute and without a trailing slash:
 * `url` may carry the path jobwire is mounted under ("https://app.example/jobs") and may
 * be relative to the page ("/jobs"); without one, the page's origin.
 */
function baseUrl(url) {
  const page = globalThis.location?.href;
  if (url == null) return globalThis.location?.origin ?? "";
  const absolute = page ? new URL(url, page) : new URL(url);
  return `${absolute.origin}${absolute.pathname}`.replace(/\/+$/, "");
}

const clients = new Map(); // "url token" -> the open Client for that server and identity
const tokenFns = new WeakMap(); // a token function -> its number: clients share by identity
let tokenFnCount = 0;

function tokenKey(token) {
  if (typeof token !== "function") return `s${token ?? ""}`;
  if (!tokenFns.has(token)) tokenFns.set(token, ++tokenFnCount);
  return `f${tokenFns.get(token)}`;
}

/**
 * The client for a server: one per page and identity, so components that each call
 * createClient() still share one WebSocket and one subscription per job. In a page the
 * defaults use the page's origin and its session cookie.
 */
export function createClient(options = {}) {
  const client = new Client(options);
  const key = `${client.base} ${tokenKey(client.token)}`;
  const open = clients.get(key);
  if (open) return open;
  clients.set(key, client);
  client._forget = () => clients.get(key) === client && clients.delete(key);
  return client;
}

export class Client {
  constructor({
    url, token, WebSocket: WS = globalThis.WebSocket, fetch: fetchFn = globalThis.fetch,
    backoffMs = 250, maxBackoffMs = 8000, fallbackAfter = 2, stableMs = 1000, pollWait = 20,
  } = {}) {
    this.base = baseUrl(url);
    this.token = token ?? null;
    this._WS = WS;
    this._fetch = (...args) => fetchFn(...args); // a bare window.fetch needs `this` unset
    this.opts = { backoffMs, maxBackoffMs, fallbackAfter, stableMs, pollWait };
    this.state = ConnectionState.IDLE;
    this._stateListeners = new Set();
    this._entries = new Map(); // job id -> entry (one per job, however many watchers)
    this._seeds = new Map(); // job id -> a snapshot known complete at its seq (no items yet)
    // The owner feed: one on the server (all statuses) whatever the number of listeners.
    this._feed = { jobs: new Map(), cursor: 0, ready: false, listeners: new Set() };
    this._socket = null;
    this._failures = 0; // consecutive sockets that closed before proving stable
    this._reconnectTimer = null;
    this._recovering = null;
    this._closed = false;
    this._forget = () => {};
    this._fresh = null; // the last token a token function returned
    this._refreshing = null; // the token function's call in flight, shared by all callers
    this._refused = false; // a socket closed 4401 and none has worked since
    this._opening = null; // waiting for a token before opening a socket
  }

  // -- tokens: a string is used as is; a function (e.g. an identity provider's getToken)
  // is asked before each socket and once after a 401, so short-lived tokens are renewed.

  get _renews() {
    return typeof this.token === "function";
  }

  // The token to send now, asking the function only if it has not answered yet.
  async _authToken() {
    if (!this._renews) return this.token;
    return this._fresh ?? this._renew(null);
  }

  // A token other than `stale`: calls the function unless a call already replaced `stale`
  // (concurrent 401s share one call).
  _renew(stale) {
    if (this._fresh !== stale) return Promise.resolve(this._fresh);
    this._refreshing ??= (async () => {
      try {
        this._fresh = await this.token();
        return this._fresh;
      } finally {
        this._refreshing = null;
      }
    })();
    return this._refreshing;
  }

  // -- REST

  async request(method, path, body, signal) {
    const send = (token) => {
      const headers = {};
      if (body !== undefined) headers["content-type"] = "application/json";
      if (token) headers.authorization = `Bearer ${token}`;
      return this._fetch(this.base + path, {
        method, headers, credentials: "same-origin",
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
      });
    };
    const token = await this._authToken();
    let response = await send(token);
    // Once only: a fresh token refused too is the caller's 401, not a loop.
    if (response.status === 401 && this._renews) response = await send(await this._renew(token));
    if (response.status === 204) return null;
    const text = await response.text();
    let parsed = null;
    try { parsed = text ? JSON.parse(text) : null; } catch { parsed = text; }
    if (!response.ok) throw new HttpError(response.status, parsed ?? text);
    return parsed;
  }

  /**
   * Submit a job; an active job with the same key comes back with created: false.
   * `delay` (seconds) or `runAt` (a Date, or ISO 8601 text with a zone): not before then.
   * `priority`: within the range the task allows.
   */
  async submit(task, input, key, { delay, runAt, priority } = {}) {
    const body = { task, input: input ?? null };
    if (key != null) body.key = key;
    if (delay != null) body.delay = delay;
    if (runAt != null) body.run_at = runAt instanceof Date ? runAt.toISOString() : runAt;
    if (priority != null) body.priority = priority;
    const out = await this.request("POST", "/api/jobs", body);
    this._seed(out.job);
    return deepFreeze(out);
  }

  async job(id) {
    return deepFreeze(await this.request("GET", `/api/jobs/${encodeURIComponent(id)}`));
  }

  /**
   * The caller's jobs, newest first; status may be "active" (queued or running).
   * Without onList, one read (a Promise of the list). With it, live: onList(list) now and
   * after every creation, status change or deletion, until the returned function is
   * called; after a reconnect the list resumes from the feed's cursor.
   */
  jobs(options = {}, onList) {
    if (typeof onList !== "function") return this._list(options);
    const listener = { status: options.status ?? null, onList };
    const feed = this._feed;
    feed.listeners.add(listener);
    if (feed.listeners.size === 1) {
      if (this._socketOpen) this._watchJobs();
      else this.connect();
    } else if (feed.ready) {
      queueMicrotask(() => feed.listeners.has(listener)
        && onList(listJobs(feed.jobs, listener.status)));
    }
    return () => {
      if (!feed.listeners.delete(listener) || feed.listeners.size) return;
      if (this._socketOpen) this._send({ op: "unwatch_jobs" });
    };
  }

  async _list({ status, limit } = {}) {
    const q = new URLSearchParams();
    if (status) q.set("status", status);
    if (limit) q.set("limit", String(limit));
    const list = await this.request("GET", `/api/jobs${q.size ? `?${q}` : ""}`);
    list.forEach((j) => this._seed(j));
    return deepFreeze(list);
  }

  /** The owner's active jobs, e.g. after a reload. Concurrent calls share one request. */
  recover() {
    this._recovering ??= this._list({ status: "active" })
      .finally(() => { this._recovering = null; });
    return this._recovering;
  }

  async cancel(id) {
    return deepFreeze(await this.request("POST", `/api/jobs/${encodeURIComponent(id)}/cancel`));
  }

  /** Delete a finished job (the server answers 409 while it is active). */
  async remove(id) {
    await this.request("DELETE", `/api/jobs/${encodeURIComponent(id)}`);
  }

  // A snapshot with no items is complete as it stands: watching it needs no resync.
  _seed(job) {
    if (job.progress.total === 0) this._seeds.set(job.id, job);
  }

  // -- connection state

  /** Call `listener(state)` now and on every change; returns a function that stops it. */
  onState(listener) {
    this._stateListeners.add(listener);
    listener(this.state);
    return () => this._stateListeners.delete(listener);
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    for (const listener of this._stateListeners) listener(state);
  }

  get _polling() {
    return this.state === ConnectionState.POLLING;
  }

  // -- watching

  /**
   * Call onSnapshot(view) with the job's state now and after every change, in seq order,
   * until the job ends or the returned function is called. Any number of watchers of one
   * job share one server subscription.
   */
  watch(jobId, onSnapshot, { onError } = {}) {
    let entry = this._entries.get(jobId);
    const watcher = { onSnapshot, onError };
    if (!entry) {
      entry = {
        id: jobId, state: new JobState(jobId), watchers: new Set([watcher]),
        subscribed: false, // a subscribe was sent on the current socket
        confirmed: false, // ...and the server answered it
        resyncing: null, poller: null, gone: null, // gone: the error that ended following
      };
      this._entries.set(jobId, entry);
      this.connect(); // in parallel with reading the job's state
      const seed = this._seeds.get(jobId);
      this._seeds.delete(jobId);
      if (seed) {
        entry.state.reset(seed, []);
        queueMicrotask(() => this._emit(entry));
        this._follow(entry);
      } else {
        this._resync(entry);
      }
    } else {
      entry.watchers.add(watcher);
      const { view } = entry.state;
      queueMicrotask(() => {
        if (!entry.watchers.has(watcher)) return;
        if (entry.gone) onError?.(entry.gone);
        else if (view) onSnapshot(view);
      });
    }
    return () => {
      entry.watchers.delete(watcher);
      if (entry.watchers.size === 0 && this._entries.get(jobId) === entry) this._drop(entry);
    };
  }

  _emit(entry) {
    const view = entry.state.view;
    for (const w of [...entry.watchers]) {
      try { w.onSnapshot(view); } catch (err) { console.error(err); }
    }
  }

  _fail(entry, error) {
    entry.gone = error;
    this._stopFollowing(entry);
    for (const w of [...entry.watchers]) w.onError?.(error);
  }

  _drop(entry) {
    this._entries.delete(entry.id);
    this._stopFollowing(entry);
  }

  _stopFollowing(entry) {
    this._stopPoller(entry);
    // After a terminal event the server has dropped the subscription itself.
    if (entry.subscribed && this._socketOpen && !entry.state.terminal) {
      this._send({ op: "unsubscribe", job: entry.id });
    }
    entry.subscribed = entry.confirmed = false;
  }

  // Get events after the entry's seq: over the socket when it works, else by long-poll.
  _follow(entry) {
    if (entry.gone || entry.resyncing || entry.state.terminal || !entry.state.ready) return;
    if (this._socketOpen) this._subscribe(entry);
    else this.connect();
    if (this._polling) this._startPoller(entry);
  }

  // Feed one event to its job. Returns false when it cannot be used (the caller stops).
  _receive(event) {
    const entry = this._entries.get(event.job);
    if (!entry) return false; // not watched here: foreign or late
    const outcome = entry.state.offer(event);
    if (outcome === Offer.APPLIED) {
      this._emit(entry);
      if (entry.state.terminal) this._stopFollowing(entry);
      return true;
    }
    if (outcome === Offer.GAP) this._resync(entry);
    return outcome === Offer.DUPLICATE;
  }

  // Rebuild the state from REST at one seq, then follow from there. Single-flight.
  _resync(entry) {
    if (entry.resyncing) return entry.resyncing;
    this._stopFollowing(entry);
    const watched = () => !entry.gone && this._entries.get(entry.id) === entry;
    entry.resyncing = (async () => {
      for (let attempt = 0; watched(); attempt++) {
        try {
          await this._load(entry);
          break;
        } catch (err) {
          if (err instanceof HttpError && err.status === 404) {
            this._fail(entry, err);
            break;
          }
          await sleep(this._backoff(attempt));
        }
      }
      entry.resyncing = null;
      if (!watched() || !entry.state.ready) return;
      this._emit(entry);
      this._follow(entry);
    })();
    return entry.resyncing;
  }

  // Read the job at seq J, then its items at seq I >= J, then fold the job's events
  // J+1..I into the job fields: job and items then describe the same seq I.
  async _load(entry) {
    const path = `/api/jobs/${encodeURIComponent(entry.id)}`;
    let job = await this.request("GET", path);
    if (job.progress.total === 0) {
      entry.state.reset(job, []);
      return;
    }
    const { seq, items } = await this.request("GET", `${path}/items`);
    let itemMap = new Map();
    while (job.seq < seq) {
      const { events } = await this.request("GET", `${path}/events?after=${job.seq}`);
      if (events[0]?.seq !== job.seq + 1) throw new Error(`event ${job.seq + 1} missing`);
      for (const ev of events) {
        if (ev.seq !== job.seq + 1 || ev.seq > seq) break;
        ({ snapshot: job, items: itemMap } = applyEvent(job, itemMap, ev));
      }
    }
    entry.state.reset(job, items);
  }

  _backoff(attempt) {
    const { backoffMs, maxBackoffMs } = this.opts;
    const ceiling = Math.min(maxBackoffMs, backoffMs * 2 ** attempt);
    return ceiling / 2 + Math.random() * ceiling / 2; // jitter spreads reconnecting pages
  }

  // -- WebSocket

  get _socketOpen() {
    return this._socket !== null && this._socket.readyState === 1;
  }

  /** Open the page's WebSocket now (watch() also opens it when first needed). */
  connect() {
    if (this._closed || this._socket || this._reconnectTimer || this._opening) return;
    if (this.state === ConnectionState.IDLE) this._setState(ConnectionState.CONNECTING);
    if (!this._renews) {
      this._open(this.token);
      return;
    }
    // A fresh token for every socket: the last one may expire while this one is open.
    this._opening = this._renew(this._fresh).then(
      (token) => { this._opening = null; if (!this._closed) this._open(token); },
      () => { this._opening = null; this._socketClosed(null); });
  }

  _open(token) {
    // The token goes in the first message, never in the URL (URLs end up in logs), and
    // wins over any session cookie the browser sends; without one, the cookie is used.
    const url = `${this.base.replace(/^http/, "ws")}/api/ws${token ? "?auth=message" : ""}`;
    let socket;
    try {
      socket = new this._WS(url);
    } catch {
      this._socketClosed(null);
      return;
    }
    this._socket = socket;
    let stableTimer = null;
    const stable = () => {
      clearTimeout(stableTimer);
      if (this._socket !== socket) return;
      this._failures = 0;
      this._refused = false;
      this._setState(ConnectionState.LIVE);
    };
    socket.onopen = () => {
      // Frames arrive in order, so the server reads this before any subscribe below.
      if (token) this._send({ op: "auth", token });
      // After failures the socket must prove itself (a message, or staying open) before
      // the pollers stand down, so a socket that opens and drops at once does not flap.
      if (this._failures === 0) stable();
      else stableTimer = setTimeout(stable, this.opts.stableMs);
      for (const entry of this._entries.values()) this._follow(entry);
      if (this._feed.listeners.size) this._watchJobs();
    };
    socket.onmessage = (m) => {
      if (this.state !== ConnectionState.LIVE) stable();
      this._onMessage(m.data);
    };
    socket.onclose = (event) => {
      clearTimeout(stableTimer);
      this._socketClosed(socket, event);
    };
  }

  _send(message) {
    this._socket.send(JSON.stringify(message));
  }

  _watchJobs() {
    this._send({ op: "watch_jobs", status: null, after: this._feed.cursor });
  }

  _onJobs(msg) {
    const feed = this._feed;
    if (!feed.listeners.size) return; // unwatched: the next watch resumes from the cursor
    feed.jobs = foldJobs(feed.jobs, msg);
    feed.cursor = msg.cursor;
    feed.ready = true;
    for (const { status, onList } of [...feed.listeners]) {
      try { onList(listJobs(feed.jobs, status)); } catch (err) { console.error(err); }
    }
  }

  _subscribe(entry) {
    if (entry.subscribed) return;
    entry.subscribed = true;
    entry.confirmed = false;
    this._send({ op: "subscribe", job: entry.id, after: entry.state.seq });
  }

  // A frame is one message (a reply or an event), or an array of events in order: the
  // server sends whatever is pending for this socket as one frame.
  _onMessage(raw) {
    let parsed;
    try { parsed = JSON.parse(raw); } catch { return; }
    for (const msg of Array.isArray(parsed) ? parsed : [parsed]) this._onOne(msg);
  }

  _onOne(msg) {
    if (msg?.op === "jobs") this._onJobs(msg);
    if (!msg || typeof msg.job !== "string") return;
    const entry = this._entries.get(msg.job);
    if (msg.op === undefined) {
      // Events of a subscription replaced by a resync are stale until it is confirmed.
      if (entry?.confirmed) this._receive(msg);
    } else if (msg.op === "subscribed" && entry?.subscribed) {
      entry.confirmed = true;
      this._stopPoller(entry); // the socket carries this job again
    } else if (msg.op === "error" && entry?.subscribed) {
      if (msg.code === 404) {
        this._fail(entry, new HttpError(404, msg));
      } else {
        // Refused (e.g. too many subscriptions): long-poll this job instead of retrying
        // the socket in a loop; the next socket subscribes it again.
        entry.subscribed = false;
        this._startPoller(entry);
      }
    }
  }

  _socketClosed(socket, event) {
    if (socket !== null && this._socket !== socket) return;
    this._socket = null;
    for (const entry of this._entries.values()) entry.subscribed = entry.confirmed = false;
    if (this._closed) return;
    if (event?.code === 4401 && this._renews) {
      // The token expired (or was refused): the next socket asks for a fresh one. If that
      // one is refused too, the watchers hear the 401 instead of a reconnect loop.
      if (this._refused) {
        this._refused = false;
        const error = new HttpError(401, event.reason || "token refused");
        for (const entry of [...this._entries.values()]) if (!entry.gone) this._fail(entry, error);
        this._setState(ConnectionState.IDLE);
        return;
      }
      this._refused = true;
    }
    this._failures += 1;
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      this.connect();
    }, this._backoff(this._failures - 1));
    const polling = this._failures >= this.opts.fallbackAfter;
    this._setState(polling ? ConnectionState.POLLING : ConnectionState.RECONNECTING);
    if (polling) for (const entry of this._entries.values()) this._follow(entry);
  }

  // -- long-poll fallback: one poller per job

  _startPoller(entry) {
    if (entry.poller || entry.state.terminal || entry.gone) return;
    const abort = new AbortController();
    entry.poller = abort;
    (async () => {
      const path = `/api/jobs/${encodeURIComponent(entry.id)}/events`;
      for (let attempt = 0; !abort.signal.aborted;) {
        try {
          const wait = this.opts.pollWait;
          const { events } = await this.request(
            "GET", `${path}?after=${entry.state.seq}&wait=${wait}`, undefined, abort.signal);
          attempt = 0;
          for (const ev of events) if (abort.signal.aborted || !this._receive(ev)) break;
        } catch (err) {
          if (abort.signal.aborted) break;
          if (err instanceof HttpError && err.status === 404) {
            this._fail(entry, err);
            break;
          }
          await sleep(this._backoff(attempt++), abort.signal);
        }
      }
    })();
  }

  _stopPoller(entry) {
    entry.poller?.abort();
    entry.poller = null;
  }

  /** Stop everything: socket, pollers, watchers. */
  close() {
    this._closed = true;
    this._forget();
    clearTimeout(this._reconnectTimer);
    for (const entry of [...this._entries.values()]) this._drop(entry);
    this._socket?.close();
    this._socket = null;
    this._setState(ConnectionState.IDLE);
  }
}
