// React bindings for jobwire.js. Every hook reads a module-level store through
// useSyncExternalStore, so strict mode, concurrent rendering and re-keyed effects cannot
// double-subscribe, leak a subscription or show another job's state.
import { createContext, createElement, useCallback, useContext, useMemo, useRef, useState,
  useSyncExternalStore } from "react";
import { createClient } from "jobwire";

const ClientContext = createContext(null);

/** Give the hooks below a client: `client`, or the one for `url` and `token`. */
export function JobwireProvider({ client, url, token, children }) {
  const value = useMemo(() => client ?? createClient({ url, token }), [client, url, token]);
  return createElement(ClientContext.Provider, { value }, children);
}

/** The provider's client, or else the page's own (its origin and session cookie). */
export function useJobwire() {
  const provided = useContext(ClientContext);
  return useMemo(() => provided ?? createClient(), [provided]);
}

// -- the store: one feed per (client, key), however many components read it

const feeds = new WeakMap(); // client -> Map(key -> feed)

function feedsOf(client) {
  let map = feeds.get(client);
  if (!map) feeds.set(client, map = new Map());
  return map;
}

/**
 * Subscribe `listener` to the feed `key` of `client`, starting it with `start(set)` if
 * it is new; `start` returns the function that stops it. Returns the unsubscribe.
 */
function subscribe(client, key, start, listener) {
  const map = feedsOf(client);
  let feed = map.get(key);
  if (!feed) {
    const created = { value: undefined, listeners: new Set(), stop: null };
    created.stop = start((value) => {
      created.value = value;
      for (const l of [...created.listeners]) l.notify();
    });
    feed = created;
    map.set(key, feed); // only once started: a start that throws leaves nothing behind
  }
  const entry = { notify: listener }; // one per subscription, even if React reuses a callback
  feed.listeners.add(entry);
  return () => {
    feed.listeners.delete(entry);
    if (feed.listeners.size > 0) return;
    // Strict mode's second effect run and a component re-rendering with another key
    // unsubscribe and subscribe in one commit: keep the feed through that, stop it after.
    setTimeout(() => {
      if (feed.listeners.size === 0 && map.get(key) === feed) {
        map.delete(key);
        feed.stop();
      }
    }, 0);
  };
}

function read(client, key) {
  return feeds.get(client)?.get(key)?.value;
}

function useFeed(key, start) {
  const client = useJobwire();
  // `start` is memoized on what `key` names, so it changes only with the key.
  const sub = useCallback(
    (listener) => (key === null ? () => {}
      : subscribe(client, key, (set) => start(client, set), listener)),
    [client, key, start]);
  const snap = useCallback(() => (key === null ? undefined : read(client, key)), [client, key]);
  return useSyncExternalStore(sub, snap, snap);
}

// -- the hooks

function watchJob(id) {
  return (client, set) => client.watch(id, set, {
    onError: (error) => set(Object.freeze({ id, error })),
  });
}

/**
 * The live snapshot of job `id`: undefined while it loads, null for a null id, and
 * `{ id, error }` if it cannot be followed (e.g. deleted). Snapshots are deeply frozen and
 * the same object until the job's next event.
 */
export function useJob(id) {
  const key = id == null ? null : `job ${id}`;
  const value = useFeed(key, useMemo(() => watchJob(id), [id]));
  if (id == null) return null;
  return value?.id === id ? value : undefined;
}

function liveJobs(status) {
  return (client, set) => {
    const stop = client.jobs({ status }, (list) => set(Object.freeze(list)));
    if (typeof stop !== "function") {
      throw new Error("useJobs needs the live owner feed jw.jobs({status}, callback) of "
        + "jobwire.js, which this jobwire.js does not have");
    }
    return stop;
  };
}

/** The caller's jobs (of `status`, e.g. "active"), live: undefined while loading. */
export function useJobs({ status } = {}) {
  const key = `jobs ${status ?? ""}`;
  return useFeed(key, useMemo(() => liveJobs(status), [status]));
}

const IDLE = Object.freeze({ pending: false, error: null, created: undefined, job: undefined });

/**
 * Submit jobs of `task`. `submit(input, { key })` resolves to `{ created, job }`, or to
 * undefined on failure (then `error` says why); while one is in flight another call
 * returns the same promise, so a double click makes one job. Each submit starts from a
 * clean state, so nothing of the previous run shows. `created` is false when an active
 * job of the same task and key was already running.
 */
export function useSubmit(task) {
  const client = useJobwire();
  const [state, setState] = useState(IDLE);
  const inFlight = useRef(null);
  const submit = useCallback((input, { key } = {}) => {
    if (inFlight.current) return inFlight.current;
    setState({ ...IDLE, pending: true });
    const request = client.submit(task, input, key).then(
      (out) => {
        setState({ pending: false, error: null, created: out.created, job: out.job });
        return out;
      },
      (error) => {
        setState({ ...IDLE, error });
        return undefined;
      },
    ).finally(() => { inFlight.current = null; });
    inFlight.current = request;
    return request;
  }, [client, task]);
  return { ...state, submit };
}
