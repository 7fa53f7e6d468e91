// The dashboard at `/`: start demo jobs and follow every job of this session live.
// Each job is one card keyed by its id, fed only by jobwire.js snapshots of that job.
import { HttpError, createClient, isTerminal } from "./jobwire.js";

// Where jobwire is served: this module is at <base>static/dashboard.js, so the page works
// unchanged when a host app mounts jobwire under a path ("/jobs/").
const BASE = new URL("..", import.meta.url).href;

const CHIP_LIMIT = 20; // up to this many items are shown by name, more as small cells
const CELL_LIMIT = 1000; // cells beyond this are summarised as "+N more"
const PAGE = 30; // ended jobs shown at first, and how many more each "Older jobs" shows

const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);
const list = $("jobs");
const cards = new Map(); // job id -> { el, latest, unwatch, scheduled }

// One request, which keeps a valid session (200) or starts a guest (201): no probe that
// fails on a first visit. Tabs opened at once must not each create a guest session: the
// second cookie would replace the first and split the tabs' jobs between two owners.
async function ensureSession() {
  const open = async () => {
    const r = await fetch(`${BASE}api/sessions`, { method: "POST", credentials: "same-origin" });
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new HttpError(r.status, body);
    return body;
  };
  return navigator.locks ? navigator.locks.request("jobwire-session", open) : open();
}

function showSession({ owner, previous }) {
  const user = owner.startsWith("user:");
  $("who").textContent = user ? `signed in as ${owner.slice(5)}` : "guest";
  $("who").dataset.owner = owner;
  $("signin-form").hidden = user;
  const notice = $("session-notice");
  notice.hidden = previous !== "ended";
  notice.textContent = "Your earlier guest session has ended: a user signed in with it, or it "
    + "expired. This is a new guest session; sign in as that user to see its jobs.";
}

// What went wrong, as a person reads it: the fields a 422 names (without the "input."
// every task input's fields start with), the server's words, or that it is unreachable.
function describe(err) {
  if (!(err instanceof HttpError)) return `cannot reach the server (${err.message ?? err})`;
  if (!err.fields.length) return err.message;
  return err.fields.map(({ field, message }) => {
    const name = field.replace(/^input\.?/, "");
    return name ? `${name}: ${message}` : message;
  }).join("; ");
}

function showError(err) {
  const box = $("form-error");
  box.textContent = err ? describe(err) : "";
  box.hidden = !err;
  // A network error goes away with the server's return (the feed is live again).
  box.dataset.kind = err && !(err instanceof HttpError) ? "network" : "";
}

function showNote(text) {
  $("form-note").textContent = text ?? "";
  $("form-note").hidden = !text;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

// Local time, with the date unless it is today.
function when(iso) {
  const at = new Date(iso);
  const today = at.toDateString() === new Date().toDateString();
  return (today ? timeFormat : dateTimeFormat).format(at);
}

function addJob(job, { first = false } = {}) {
  if (cards.has(job.id)) return;
  const el = document.getElementById("job-card").content.firstElementChild.cloneNode(true);
  el.dataset.jobId = job.id;
  el.querySelector(".task").textContent = job.task;
  el.querySelector(".id").textContent = job.id.slice(0, 8);
  const card = { el, latest: null, scheduled: false, unwatch: null };
  cards.set(job.id, card);
  $("cancel", el).onclick = () => act(card, () => client.cancel(job.id));
  $("delete", el).onclick = () => act(card, async () => {
    await client.remove(job.id);
    removeJob(job.id);
  });
  if (first) list.prepend(el);
  else list.append(el);
  $("empty").hidden = true;
  card.unwatch = client.watch(job.id, (snapshot) => {
    const initial = card.latest === null;
    card.latest = snapshot;
    if (initial) render(card); // no empty card, not even for a frame
    else if (!card.scheduled) {
      card.scheduled = true;
      requestAnimationFrame(() => { card.scheduled = false; render(card); });
    }
  }, { onError: () => removeJob(job.id) }); // deleted elsewhere or pruned
}

function removeJob(id) {
  const card = cards.get(id);
  if (!card) return;
  card.unwatch();
  card.el.remove();
  cards.delete(id);
  $("empty").hidden = cards.size > 0;
}

async function act(card, fn) {
  for (const b of card.el.querySelectorAll("button")) b.disabled = true;
  try {
    await fn();
    showError(null);
  } catch (err) {
    showError(err);
  } finally {
    if (card.latest) render(card);
  }
}

function render({ el, latest: job }) {
  const { total, done, failed } = job.progress;
  const terminal = isTerminal(job.status);
  Object.assign(el.dataset, {
    status: job.status, seq: job.seq, done, failed, total,
  });
  const status = $("status", el);
  status.dataset.status = job.status;
  status.textContent = job.cancel_requested && !terminal ? "cancelling" : job.status;

  const bar = $("progress", el);
  bar.setAttribute("aria-valuemax", String(total));
  bar.setAttribute("aria-valuenow", String(done + failed));
  bar.querySelector(".done").style.width = `${total ? (100 * done) / total : 0}%`;
  bar.querySelector(".failed").style.width = `${total ? (100 * failed) / total : 0}%`;
  $("counts", el).textContent =
    `${done + failed} / ${total} items · ${failed} failed · attempt ${job.attempt} · seq ${job.seq}`;

  renderItems($("items", el), job.items);

  const stamp = $("when", el);
  stamp.textContent = `created ${when(job.created_at)}`
    + (job.finished_at ? ` · finished ${when(job.finished_at)}` : "");
  stamp.title = `created ${job.created_at}${job.finished_at ? `, finished ${job.finished_at}` : ""}`;

  // A queued job's error is why its last attempt ended: it is requeued, not failed.
  const error = $("error", el);
  error.hidden = !job.error;
  error.dataset.kind = job.status === "queued" && job.error ? "requeued" : "";
  error.textContent = job.error ?? "";
  const result = $("result", el);
  result.hidden = job.result == null;
  result.querySelector("pre").textContent =
    job.result == null ? "" : JSON.stringify(job.result, null, 2);

  $("cancel", el).disabled = terminal || job.cancel_requested;
  $("delete", el).disabled = !terminal;
}

function renderItems(box, items) {
  const chips = items.length <= CHIP_LIMIT;
  const shown = items.slice(0, CELL_LIMIT).map((it) => {
    const li = document.createElement("li");
    li.className = chips ? "chip" : "cell";
    li.dataset.state = it.status;
    li.title = `${it.ref}: ${it.status}${it.error ? ` (${it.error})` : ""}`;
    if (chips) li.textContent = it.ref;
    return li;
  });
  if (items.length > CELL_LIMIT) {
    const more = document.createElement("li");
    more.className = "more";
    more.textContent = `+${items.length - CELL_LIMIT} more`;
    shown.push(more);
  }
  box.replaceChildren(...shown);
}

// Submits in flight: the list waits for them, so a job started here gets its card from
// the submit's answer (its first state) even when the feed announces it first.
let submitting = Promise.resolve();

// A double click's second click comes within this long of the first.
const DOUBLE_CLICK_MS = 500;

// One submit per form at a time: its button stays disabled until the answer is in, and
// at least DOUBLE_CLICK_MS (a fast server may answer between the two clicks), so a double
// click is one job.
function start(form, task, input) {
  const button = form.querySelector("button[type=submit]");
  if (button.disabled) return;
  button.disabled = true;
  const clicked = Date.now();
  submitting = Promise.all([submitting, (async () => {
    try {
      const { job, created } = await client.submit(task, input);
      addJob(job, { first: true });
      showError(null);
      showNote(created ? null : `already running: job ${job.id.slice(0, 8)}`);
      if (!created) cards.get(job.id)?.el.scrollIntoView({ block: "nearest" });
    } catch (err) {
      showError(err);
      showNote(null);
    } finally {
      setTimeout(() => { button.disabled = false; },
                 Math.max(0, clicked + DOUBLE_CLICK_MS - Date.now()));
    }
  })()]);
}

function showConnection(state) {
  const box = $("connection");
  box.dataset.state = state;
  box.textContent = state;
}

document.getElementById("tracks-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const n = Number(new FormData(e.target).get("count"));
  const stamp = Date.now().toString(36);
  start(e.target, "analyze_tracks",
        { tracks: Array.from({ length: n }, (_, i) => `track-${stamp}-${i}`) });
});
document.getElementById("post-form").addEventListener("submit", (e) => {
  e.preventDefault();
  start(e.target, "extract_post", { url: new FormData(e.target).get("url") });
});
$("post-url").value = `${BASE}demo/posts/${Math.floor(Math.random() * 5)}`;

const client = createClient({ url: BASE });
window.jobwire = client; // for the browser tests and the curious

document.getElementById("signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const button = e.target.querySelector("button");
  button.disabled = true;
  try {
    await client.request("POST", "/api/sessions/signin",
                         { token: new FormData(e.target).get("token") });
    location.reload(); // this page's socket and list were the guest's
  } catch (err) {
    showError(err);
    button.disabled = false;
  }
});

try {
  showSession(await ensureSession());
} catch (err) {
  showError(err); // e.g. too many new sessions from this address: said, not thrown
}
client.onState((state) => {
  showConnection(state);
  if (state === "live" && $("form-error").dataset.kind === "network") showError(null);
});
client.connect();

// The session's jobs, live: those started or deleted in another tab come and go here too.
// Active ones all show, ended ones the most recent. A card goes only once the feed has
// listed its job and then not: one just submitted here may not have reached it yet.
let listed = new Set();
let latest = [];
let ended = PAGE; // how many ended jobs show: "Older jobs" shows the next page
function showList() {
  let endedSeen = 0;
  const shown = latest.filter((job) => !isTerminal(job.status) || endedSeen++ < ended);
  const older = latest.length - shown.length;
  $("older").hidden = older === 0;
  $("older").textContent = `Older jobs (${older})`;
  const ids = new Set(shown.map((job) => job.id));
  for (const id of listed) if (!ids.has(id)) removeJob(id);
  listed = ids;
  shown.forEach((job) => addJob(job));
  list.append(...shown.map((job) => cards.get(job.id).el)); // newest first
  document.body.dataset.ready = "true";
}
$("older").addEventListener("click", () => {
  ended += PAGE;
  showList();
});
client.jobs({}, (jobs) => {
  latest = jobs;
  submitting.then(showList); // (always the latest list, whichever submit ends first)
});
