// Builds Palette's web page into ../server/web (shipped in the Python package):
//   1. the TypeScript client generated from ../protos by protoc-gen-es into src/gen (committed, like the Python code),
//   2. a type check (tsc), 3. one bundle (esbuild) plus the page and its styles, copied as they are.
// Options: --out DIR (instead of ../server/web), --gen DIR (instead of src/gen), --no-check.
// PYTHON names the interpreter with grpcio-tools (default ../.venv/bin/python). The output is deterministic:
// tests/test_web.py rebuilds into a temporary folder and compares it with the committed files.

import { spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "..");
const args = process.argv.slice(2);
const option = (name, fallback) => (args.includes(name) ? resolve(args[args.indexOf(name) + 1]) : fallback);
const out = option("--out", join(repo, "server", "web"));
const gen = option("--gen", join(here, "src", "gen"));

function run(command, commandArgs) {
  const result = spawnSync(command, commandArgs, { cwd: here, stdio: "inherit" });
  if (result.status !== 0) {
    console.error(`build: ${command} ${commandArgs.join(" ")} failed`);
    process.exit(1);
  }
}

mkdirSync(gen, { recursive: true });
run(process.env.PYTHON ?? join(repo, ".venv", "bin", "python"), [
  "-m", "grpc_tools.protoc", `-I${join(repo, "protos")}`,
  `--plugin=protoc-gen-es=${join(here, "node_modules", ".bin", "protoc-gen-es")}`,
  `--es_out=${gen}`, "--es_opt=target=ts", join(repo, "protos", "palette", "v1", "palette.proto"),
]);
if (!args.includes("--no-check")) run(join(here, "node_modules", ".bin", "tsc"), ["--noEmit", "-p", here]);

const locked = JSON.parse(readFileSync(join(here, "package-lock.json"), "utf8")).packages;
const bundled = ["@bufbuild/protobuf", "@connectrpc/connect", "@connectrpc/connect-web"].map((name) => {
  const { version, license } = locked[`node_modules/${name}`];
  return `${name} ${version} (${license.replace(/^\((.*)\)$/, "$1")})`;
}).join(", ");
mkdirSync(out, { recursive: true });
await build({
  entryPoints: [join(here, "src", "main.ts")],
  outfile: join(out, "app.js"),
  bundle: true,
  minify: true,
  format: "iife",
  target: "es2020",
  charset: "utf8",
  legalComments: "none",
  banner: { js: `/* Palette's web page, built from web/ by \`make web\`. Bundles ${bundled}. */` },
  logLevel: "warning",
});
for (const name of ["index.html", "app.css"]) copyFileSync(join(here, "src", name), join(out, name));
console.log(`build: wrote ${out}`);
