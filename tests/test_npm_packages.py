"""The npm packages under js/: `npm pack` makes tarballs that install and import in Node,
and the jobwire package carries exactly the jobwire.js the server serves."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

STATIC = ROOT / "src" / "jobwire" / "web" / "static"
HARNESS = ROOT / "tests" / "browser" / "react"  # its `npm ci` puts React in npm's cache

# Server-side rendering with the installed packages: no server is contacted (the client
# only connects when a watch starts, which rendering to a string never does).
SMOKE = """
import { createElement as h } from "react";
import { renderToString } from "react-dom/server";
import { createClient, JobState } from "jobwire";
import { JobwireProvider, useJob, useJobs, useSubmit } from "jobwire-react";
function View({ id }) {
  const snap = useJob(id);
  const { pending } = useSubmit("t");
  return h("p", null, `${snap === undefined ? "loading" : snap} ${pending}`);
}
const client = createClient({ url: "http://127.0.0.1:9" });
const html = renderToString(h(JobwireProvider, { client }, h(View, { id: "j" }),
                                                           h(View, { id: null })));
console.log(JSON.stringify({ html, hooks: typeof useJobs, state: typeof JobState }));
"""


def run(*cmd: str, cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=120)
    return out.stdout


@pytest.fixture(scope="module")
def tarballs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("the npm package tests need node and npm")
    out = tmp_path_factory.mktemp("packs")
    found = {}
    for name in ("jobwire", "jobwire-react"):
        packed = json.loads(run("npm", "pack", "--json", "--pack-destination", str(out),
                                cwd=ROOT / "js" / name))
        found[name] = out / packed[0]["filename"]
    return found


def test_the_jobwire_package_is_the_servers_jobwire_js(tarballs: dict[str, Path]) -> None:
    with tarfile.open(tarballs["jobwire"]) as tar:
        names = sorted(tar.getnames())
        assert names == ["package/README.md", "package/jobwire.d.ts", "package/jobwire.js",
                         "package/package.json"]
        for name in ("jobwire.js", "jobwire.d.ts"):
            member = tar.extractfile(f"package/{name}")
            assert member is not None
            assert member.read() == (STATIC / name).read_bytes(), f"{name} differs"


def test_the_tarballs_install_and_import_with_react(tarballs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    react_modules = HARNESS / "node_modules"
    if not (react_modules / "react-dom").is_dir():
        pytest.skip("React is not installed in the test harness: run `make test` (npm ci) first")
    (tmp_path / "package.json").write_text('{"private": true, "type": "module"}')
    # The tarballs install offline: their only dependency is each other. React, their peer,
    # is the harness's own copy (a fresh machine's npm cache holds its tarballs but not the
    # registry documents that `npm install react@x` would need).
    run("npm", "install", "--offline", "--legacy-peer-deps", "--no-audit", "--no-fund",
        "--loglevel=error", str(tarballs["jobwire"]), str(tarballs["jobwire-react"]),
        cwd=tmp_path)
    for name in ("react", "react-dom", "scheduler"):
        shutil.copytree(react_modules / name, tmp_path / "node_modules" / name)
    (tmp_path / "smoke.mjs").write_text(SMOKE)
    out = json.loads(run("node", "smoke.mjs", cwd=tmp_path))
    assert out == {"html": "<p>loading false</p><p>null false</p>", "hooks": "function",
                   "state": "function"}
