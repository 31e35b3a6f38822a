// Tests of logic.ts: the graft command lines, the target picker's items from
// `graft targets -o json`, the status-bar text, and the programs of other
// debuggers' launch configurations.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  filterText,
  launchOf,
  parseTargets,
  runArgs,
  schemaAssociations,
  statusText,
  substitute,
  targetsArgs,
} from "../src/logic";

test("runArgs puts graft's flags before -- and the program after", () => {
  assert.deepEqual(
    runArgs({
      program: "python3",
      args: ["app.py", "--port", "8080"],
      target: "deploy/api",
      namespace: "shop",
      context: "kind",
      mode: "steal",
      filterHeader: ["x-user: alice"],
      filterMethod: ["GET"],
      agentMode: "node",
      graftArgs: ["--fs", "write"],
    }),
    [
      "run", "--target", "deploy/api", "-n", "shop", "--context", "kind", "--steal",
      "--filter-header", "x-user: alice", "--filter-method", "GET", "--agent-mode", "node",
      "--fs", "write", "--", "python3", "app.py", "--port", "8080",
    ],
  );
  assert.deepEqual(runArgs({ program: "./srv", target: "targetless" }), [
    "run", "--target", "targetless", "--", "./srv",
  ]);
  assert.throws(() => runArgs({ program: "x" }), /no target/);
  assert.throws(() => runArgs({ program: "", target: "pod/a" }), /no program/);
});

test("targetsArgs asks for JSON with the kube flags", () => {
  assert.deepEqual(targetsArgs({ namespace: "shop", kubeconfig: "/k" }), [
    "targets", "-n", "shop", "--kubeconfig", "/k", "-o", "json",
  ]);
});

const TARGETS = JSON.stringify({
  namespace: "shop",
  targets: [
    { target: "deploy/api", kind: "deployment", name: "api", namespace: "shop",
      ready: 2, desired: 3, containers: ["app", "proxy"] },
    { target: "pod/db-0", kind: "pod", name: "db-0", namespace: "shop",
      ready: 1, desired: 1, containers: ["db"] },
  ],
});

test("parseTargets offers each target, each container of a multi-container one, and targetless", () => {
  const items = parseTargets(TARGETS);
  assert.deepEqual(
    items.map((i) => i.target),
    ["deploy/api", "deploy/api/container/app", "deploy/api/container/proxy", "pod/db-0", "targetless"],
  );
  assert.equal(items[0].description, "deployment · 2/3 ready");
  assert.equal(items[0].detail, "containers: app, proxy");
  assert.deepEqual(parseTargets('{"namespace": "x", "targets": []}').map((i) => i.target), ["targetless"]);
});

test("parseTargets refuses what graft targets does not print", () => {
  assert.throws(() => parseTargets("graft: error: no cluster"), /printed no JSON/);
  assert.throws(() => parseTargets('{"sessions": []}'), /without a "targets" list/);
});

test("the status bar shows target, mode and filter as graft prints them", () => {
  const launch = {
    program: "python3",
    target: "deploy/api",
    namespace: "shop",
    mode: "steal" as const,
    filterHeader: ["x-user: alice"],
    filterPath: ["^/api/"],
  };
  assert.equal(filterText(launch), 'header~"x-user: alice" and path~"^/api/"');
  const { text, tooltip } = statusText(launch);
  assert.equal(text, '$(plug) graft: deploy/api · steal · header~"x-user: alice" and path~"^/api/"');
  assert.match(tooltip, /in deploy\/api in shop, stealing its incoming traffic matching/);
  assert.equal(statusText({ program: "x", target: "pod/a" }).text, "$(plug) graft: pod/a · mirror");
});

test("substitute expands the variables launch.json uses most", () => {
  const vars = { workspaceFolder: "/w", file: "/w/a.py", env: { HOME: "/home/me" } };
  assert.equal(substitute("${workspaceFolder}/x ${file} ${env:HOME} ${env:NOPE}|", vars), "/w/x /w/a.py /home/me |");
  assert.equal(substitute("${command:pick}", vars), "${command:pick}");
});

test("launchOf runs other debuggers' programs the way they would", () => {
  const vars = { workspaceFolder: "/w", env: {} };
  assert.deepEqual(
    launchOf({ type: "python", name: "py", program: "${workspaceFolder}/app.py", args: ["-v"] }, vars),
    { program: "python3", args: ["/w/app.py", "-v"], cwd: "/w", env: {} },
  );
  assert.deepEqual(
    launchOf({ type: "debugpy", name: "m", module: "flask", args: ["run"], python: "/venv/bin/python" }, vars)
      .args,
    ["-m", "flask", "run"],
  );
  const node = launchOf(
    { type: "node", name: "n", program: "${workspaceFolder}/srv.js", runtimeArgs: ["--inspect"],
      cwd: "${workspaceFolder}/api", env: { PORT: "8080" } },
    vars,
  );
  assert.deepEqual(node, {
    program: "node", args: ["--inspect", "/w/srv.js"], cwd: "/w/api", env: { PORT: "8080" },
  });
  assert.deepEqual(launchOf({ type: "go", name: "g", program: "${workspaceFolder}/cmd/api" }, vars), {
    program: "go", args: ["run", "/w/cmd/api"], cwd: "/w", env: {},
  });
  assert.equal(launchOf({ type: "cppdbg", name: "c", program: "/w/build/srv" }, vars).program, "/w/build/srv");
  const graft = launchOf(
    { type: "graft", name: "gr", program: "./srv", target: "deploy/api", mode: "steal" }, vars);
  assert.equal(graft.target, "deploy/api");
  assert.equal(graft.mode, "steal");
  assert.throws(() => launchOf({ type: "node", name: "attach" }, vars), /"attach" has no program/);
});

test("the bundled schema is associated with every graft.toml, other associations kept", () => {
  const assoc = schemaAssociations({ "Cargo\\.toml$": "https://x/cargo.json" }, "file:///ext/schemas/graft.schema.json");
  assert.deepEqual(assoc, {
    "Cargo\\.toml$": "https://x/cargo.json",
    "(^|/)graft\\.toml$": "file:///ext/schemas/graft.schema.json",
  });
  const re = new RegExp(Object.keys(schemaAssociations(undefined, "u"))[0]);
  assert.ok(re.test("/home/me/api/graft.toml") && re.test("graft.toml"));
  assert.ok(!re.test("/home/me/notgraft.toml") && !re.test("/x/graft.toml.bak"));
});
