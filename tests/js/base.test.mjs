// jobwire.js mounted under a path: every URL it builds keeps the prefix of its `url`.
import assert from "node:assert/strict";
import { afterEach, test } from "node:test";

import { createClient } from "../../src/jobwire/web/static/jobwire.js";
import { FakeSocket, Log, fakeFetch, until } from "./fakes.mjs";

let client;
afterEach(() => {
  client?.close();
  FakeSocket.reset();
  delete globalThis.location;
});

for (const url of ["http://jw.test/jobs/", "/jobs"]) test(`a url with a path prefix (${url}) puts every call and the socket under it`, async () => {
  // A page of the host app, which a relative url is resolved against.
  globalThis.location = { href: "http://jw.test/account/page", origin: "http://jw.test" };
  const log = new Log();
  log.start();
  const job = `/jobs/api/jobs/${log.id}`;
  const fetch = fakeFetch({
    "/jobs/api/jobs?": () => [200, []],
    [`${job}/events`]: () => [200, { job: log.id, events: [] }],
    [`${job}/items`]: () => [200, log.itemsBody()],
    [`${job}/cancel`]: () => [200, log.snapshot()],
    [job]: () => [200, log.snapshot()],
    "/jobs/api/jobs": () => [201, { created: true, job: log.snapshot() }],
  });
  client = createClient({ url, WebSocket: FakeSocket, fetch });
  await client.submit("steps", { n: 1 });
  await client.job(log.id);
  await client.jobs({ status: "active" });
  await client.cancel(log.id);
  client.watch(log.id, () => {});
  await until(() => FakeSocket.all.length === 1, "socket");
  assert.match(FakeSocket.last.url, /^ws:\/\/jw\.test\/jobs\/api\/ws(\?|$)/);
  assert.ok(fetch.calls.length >= 4);
  for (const call of fetch.calls) assert.match(call.path, /^\/jobs\/api\//, call.path);
});
