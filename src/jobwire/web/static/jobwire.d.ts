// TypeScript declarations for jobwire.js, the browser client of a jobwire server.

export type Status = "queued" | "running" | "completed" | "failed" | "cancelled";
export type ItemStatus = "pending" | "running" | "done" | "failed";
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface Progress {
  readonly total: number;
  readonly done: number;
  readonly failed: number;
}

/** A job as the REST API returns it. */
export interface Job {
  readonly id: string;
  readonly task: string;
  readonly key: string | null;
  readonly owner: string;
  readonly status: Status;
  readonly progress: Progress;
  readonly result: Json;
  readonly error: string | null;
  readonly info: Json;
  readonly attempt: number;
  readonly cancel_requested: boolean;
  /** The seq of the last event folded into this snapshot (1 = created). */
  readonly seq: number;
  readonly created_at: string;
  readonly updated_at: string;
  readonly finished_at: string | null;
  /** Not started before this (a delayed submit, or a retry's backoff); null: at once. */
  readonly run_at: string | null;
  /** Claimed before jobs of lower priority (the task's, or the submit's within its range). */
  readonly priority: number;
  /** The queue whose workers claim it. */
  readonly queue: string;
}

export interface Item {
  readonly ref: string;
  readonly status: ItemStatus;
  readonly result: Json;
  readonly error: string | null;
}

/**
 * What watchers receive: the job and its items at one seq, deeply frozen. `progress`
 * always equals the counts of `items` by status.
 */
export interface JobSnapshot extends Job {
  readonly items: readonly Item[];
}

/** One change of one job, as the server sends it. */
export interface JobEvent {
  readonly job: string;
  readonly seq: number;
  readonly type: "created" | "started" | "items" | "item" | "progress" | "cancel_requested"
    | "retrying" | "completed" | "failed" | "cancelled";
  readonly data: { readonly status: Status; readonly progress: Progress; readonly [k: string]: unknown };
  readonly at?: string;
}

/**
 * The first message a WebSocket without a token in its request (no bearer header, no
 * cookie), or opened as `/api/ws?auth=message`, must send, within 10 s, before any other
 * op; the server answers `{op: "authenticated", owner}` or closes with 4401. The client
 * sends it (on `?auth=message`) when given a `token`, so tokens never appear in URLs.
 */
export interface SocketAuth {
  readonly op: "auth";
  readonly token: string;
}

/** A control reply on the WebSocket (`/api/ws`). */
export interface SocketReply {
  readonly op: "authenticated" | "subscribed" | "unsubscribed" | "error";
  /** Who the socket is authenticated as (on "authenticated"). */
  readonly owner?: string;
  readonly job?: string;
  readonly after?: number;
  readonly code?: number;
  readonly error?: string;
}

/**
 * One WebSocket frame from the server: a reply, one event, or several events in order
 * (what was pending for the socket, coalesced into one frame). Replies always come alone.
 */
export type SocketFrame = SocketReply | JobEvent | readonly JobEvent[];

/** idle: nothing watched yet; live: WebSocket; polling: HTTP long-poll fallback. */
export type ConnectionState = "idle" | "connecting" | "live" | "reconnecting" | "polling";

export interface ClientOptions {
  /** The server, with the path jobwire is mounted under if any (e.g.
   * "https://app.example.com/jobs", or "/jobs" relative to the page); calls go to
   * `${url}/api/...`. Default: the page's origin. */
  url?: string;
  /**
   * A bearer token; without one the page's session cookie is used (same origin). It is
   * sent in headers and the WebSocket's first message, never in a URL. For short-lived
   * tokens pass a function (e.g. Clerk's `getToken`): it is called before each socket
   * opens and once after a 401 or a 4401 close (concurrent 401s share one call); a fresh
   * token refused too is the request's HttpError 401, or the watchers' onError.
   */
  token?: string | (() => string | Promise<string>);
  /** First reconnect delay in ms, doubled per failure (with jitter). Default 250. */
  backoffMs?: number;
  /** Longest reconnect delay in ms. Default 8000. */
  maxBackoffMs?: number;
  /** Failed sockets in a row before switching to long-polling. Default 2. */
  fallbackAfter?: number;
  /** How long a reopened socket must stay up before it counts as healthy, in ms. Default 1000. */
  stableMs?: number;
  /** Seconds each long-poll request waits for events. Default 20. */
  pollWait?: number;
  /** Alternatives to the global WebSocket and fetch (for tests or other runtimes). */
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
}

export interface WatchOptions {
  /** Called when the job cannot be followed, e.g. it was deleted (HttpError 404). */
  onError?: (error: Error) => void;
}

export interface SubmitResult {
  readonly created: boolean;
  readonly job: Job;
}

/** One invalid field of a 422: `field` without the request part ("input.tracks",
 * "limit", "input.tracks[3]"), `message` as the server words it. */
export interface FieldError {
  readonly field: string;
  readonly message: string;
}

/**
 * A non-2xx answer. `message` reads as a person would: the invalid fields of a 422
 * ("input.tracks: List should have at least 1 item…"), else the server's `detail`,
 * else "HTTP <status>".
 */
export declare class HttpError extends Error {
  readonly status: number;
  /** The answer's JSON, or its text when it was not JSON. */
  readonly body: unknown;
  /** The invalid fields a 422 names; empty for any other answer. */
  readonly fields: readonly FieldError[];
}

/** The invalid fields a 422 body (`{detail: [{loc, msg}]}`) names. */
export declare function fieldErrors(body: unknown): FieldError[];

export declare class Client {
  readonly state: ConnectionState;
  /** Submit a job; an active job of the same task and key comes back with created: false. */
  submit(task: string, input?: Json, key?: string | null,
         options?: { delay?: number; runAt?: Date | string; priority?: number }
         ): Promise<SubmitResult>;
  /**
   * Follow a job: `onSnapshot` gets its state now and after every change, in seq order,
   * until it ends or the returned function is called. Watchers of one job share one
   * server subscription.
   */
  watch(jobId: string, onSnapshot: (snapshot: JobSnapshot) => void,
        options?: WatchOptions): () => void;
  /** The owner's active jobs (after a reload). Concurrent calls share one request. */
  recover(): Promise<readonly Job[]>;
  job(jobId: string): Promise<Job>;
  jobs(query?: { status?: "active" | Status; limit?: number }): Promise<readonly Job[]>;
  /**
   * The caller's jobs, live: `onList` gets the list (newest first, frozen) now and after
   * every creation, status change or deletion, until the returned function is called.
   * One server feed per client however many listeners; a reconnect resumes by cursor.
   */
  jobs(query: { status?: "active" | Status }, onList: (jobs: readonly Job[]) => void
       ): () => void;
  cancel(jobId: string): Promise<Job>;
  /** Delete a finished job; rejects with HttpError 409 while it is active. */
  remove(jobId: string): Promise<void>;
  /** Any other API call: JSON in and out, the client's auth, HttpError on a non-2xx answer. */
  request<T = unknown>(method: string, path: string, body?: unknown,
                       signal?: AbortSignal): Promise<T>;
  /** Call `listener` with the connection state now and on every change. */
  onState(listener: (state: ConnectionState) => void): () => void;
  /** Open the WebSocket now (watch() opens it when first needed). */
  connect(): void;
  /** Close the socket, stop pollers, drop all watchers. */
  close(): void;
}

/**
 * The client for a server and identity (url, token). Calls with the same url and token
 * return the same open client, so a page has one WebSocket however many components ask.
 */
export declare function createClient(options?: ClientOptions): Client;

// The pure core, for custom transports and tests.

export type Offer = "applied" | "duplicate" | "foreign" | "gap" | "unready";
export declare const Offer: {
  readonly APPLIED: "applied"; readonly DUPLICATE: "duplicate"; readonly FOREIGN: "foreign";
  readonly GAP: "gap"; readonly UNREADY: "unready";
};
export declare const ConnectionState: {
  readonly IDLE: "idle"; readonly CONNECTING: "connecting"; readonly LIVE: "live";
  readonly RECONNECTING: "reconnecting"; readonly POLLING: "polling";
};
export declare const TERMINAL: readonly ["completed", "failed", "cancelled"];

export declare class JobState {
  constructor(jobId: string);
  readonly id: string;
  readonly ready: boolean;
  readonly seq: number;
  readonly terminal: boolean;
  readonly view: JobSnapshot | null;
  reset(snapshot: Job, items: readonly Item[]): void;
  offer(event: JobEvent): Offer;
}

export declare function applyEvent(snapshot: Job, items: ReadonlyMap<string, Item>,
                                   event: JobEvent): { snapshot: Job; items: Map<string, Item> };
export declare function countsOf(items: Iterable<Item>): Progress;
export declare function isTerminal(status: Status): boolean;
export declare function deepFreeze<T>(value: T): T;
/** One `jobs` message of the owner feed folded into a Map of jobs by id (a new Map). */
export declare function foldJobs(jobs: ReadonlyMap<string, Job>, message: JobsMessage
                                 ): Map<string, Job>;
/** The Map's jobs of a status ("active", one status, or all), newest first. */
export declare function listJobs(jobs: ReadonlyMap<string, Job>, status?: "active" | Status | null
                                 ): readonly Job[];
/** The owner feed's message (`watch_jobs` on the WebSocket, `GET /api/jobs/stream`). */
export interface JobsMessage {
  op: "jobs";
  cursor: number;
  reset: boolean;
  changes: readonly { id: string; job: Job | null }[];
}
