// The examples' page: "Analyse my liked tracks" and every job of the signed-in user with
// live per-track progress, through jobwire.js. Configured by <meta> tags:
//   jobwire-url  where jobwire is: another origin, or a path of this app ("/jobs")
//   me-url       a route of this app answering {token, tracks}: a fresh JWT for jobwire,
//                and what to submit (the sidecar); without it the cookie identifies the user
//   submit-url   a route of this app that starts the analysis itself (the mounted app)
const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content;
const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

const base = new URL(meta("jobwire-url"), location.href).href.replace(/\/$/, "");
const me = async () => (await fetch(meta("me-url"))).json();
// A module from another origin: jobwire must answer it with CORS headers for this origin.
const { createClient } = await import(`${base}/static/jobwire.js`);
// The token is asked for before each socket and after a 401, so one that expired while
// the page was open is replaced instead of failing.
const token = meta("me-url") ? async () => (await me()).token : undefined;
const client = createClient({ url: base, token });

client.onState((state) => {
  $("connection").dataset.state = state;
  $("connection").textContent = state;
});
client.connect(); // live before the first job starts

function render(card, job) {
  const { done, failed, total } = job.progress;
  Object.assign(card.dataset, { status: job.status, done, failed, total });
  card.firstChild.textContent = `${job.id.slice(0, 8)} ${job.status}: ${done + failed}/${total} tracks`;
  const rows = card.lastChild;
  rows.replaceChildren(...job.items.map((item) => {
    const row = document.createElement("li");
    Object.assign(row.dataset, { testid: "track", ref: item.ref, status: item.status });
    const tempo = item.result?.tempo_bpm;
    row.textContent = `${item.ref}: ${item.status}${tempo ? `, ${tempo} BPM` : ""}`;
    return row;
  }));
}

function show(jobId) {
  if (document.querySelector(`[data-job-id="${jobId}"]`)) return;
  const card = document.createElement("li");
  Object.assign(card.dataset, { testid: "job", jobId });
  card.append(document.createElement("span"), document.createElement("ul"));
  $("jobs").prepend(card);
  client.watch(jobId, (job) => render(card, job), {
    onError: (error) => { card.dataset.error = error.message; },
  });
}

async function analyse() {
  try {
    if (meta("submit-url")) {
      const response = await fetch(meta("submit-url"), { method: "POST" });
      if (!response.ok) throw new Error(`${meta("submit-url")}: ${response.status}`);
      show((await response.json()).job);
    } else {
      show((await client.submit("analyze_tracks", { tracks: (await me()).tracks })).job.id);
    }
  } catch (error) {
    $("error").textContent = error.message;
  }
}

// Newest first from the server; each card goes on top, so show the oldest first.
for (const job of (await client.jobs({ limit: 20 })).reverse()) show(job.id);
$("analyse").onclick = analyse;
$("analyse").disabled = false;
document.body.dataset.ready = "true";
