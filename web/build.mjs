// Bundles the browser console: web/src -> web/dist/assets/app.js, plus the static files.
// Run by scripts/setup.sh (npm run build:web); the edge companion serves web/dist.
import { build } from "esbuild";
import { cpSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
rmSync(dist, { recursive: true, force: true });
mkdirSync(join(dist, "assets"), { recursive: true });
await build({
  entryPoints: [join(here, "src", "main.ts")],
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  sourcemap: "linked",
  outfile: join(dist, "assets", "app.js"),
  logLevel: "warning",
});
cpSync(join(here, "public", "index.html"), join(dist, "index.html"));
cpSync(join(here, "public", "app.css"), join(dist, "assets", "app.css"));
console.log("web: built web/dist");
