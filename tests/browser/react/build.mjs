// Bundle app.jsx with React's development build (so <StrictMode> double-invokes effects),
// the jobwire-react sources and the jobwire.js the server serves, into the directory given.
import { build } from "esbuild";
import { fileURLToPath } from "node:url";

const here = (path) => fileURLToPath(new URL(path, import.meta.url));
const outdir = process.argv[2];
if (!outdir) throw new Error("usage: node build.mjs OUTDIR");

await build({
  entryPoints: [here("app.jsx")],
  bundle: true,
  format: "esm",
  jsx: "automatic",
  outdir,
  alias: {
    "jobwire-react": here("../../../js/jobwire-react/index.js"),
    jobwire: here("../../../src/jobwire/web/static/jobwire.js"),
  },
  nodePaths: [here("node_modules")], // React for js/jobwire-react, which has no node_modules
  define: { "process.env.NODE_ENV": '"development"' },
  logLevel: "warning",
});
