// Tests of the debug adapter: the DAP exchange with a fake process (the
// requests VS Code sends, in its order), and with a real process started by
// node's child_process (a stand-in for graft that prints its arguments and
// exits on SIGINT as graft does).

import assert from "node:assert/strict";
import { chmodSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { GraftAdapter, Message, Request, Spawned, quote } from "../src/adapter";
import { nodeSpawner, run } from "../src/spawn";

class FakeProcess implements Spawned {
  stdout: ((t: string) => void)[] = [];
  stderr: ((t: string) => void)[] = [];
  exit: ((c: number | null, s: string | null) => void)[] = [];
  error: ((e: Error) => void)[] = [];
  signals: string[] = [];
  onStdout(l: (t: string) => void) { this.stdout.push(l); }
  onStderr(l: (t: string) => void) { this.stderr.push(l); }
  onExit(l: (c: number | null, s: string | null) => void) { this.exit.push(l); }
  onError(l: (e: Error) => void) { this.error.push(l); }
  kill(signal: string) { this.signals.push(signal); }
}

let seq = 1;
function request(command: string, args?: unknown): Request {
  return { seq: seq++, type: "request", command, arguments: args };
}

function setup(graceMs = 50) {
  const sent: Message[] = [];
  const spawned: { command: string; args: string[]; options: unknown; process: FakeProcess }[] = [];
  const adapter = new GraftAdapter(
    (command, args, options) => {
      const process = new FakeProcess();
      spawned.push({ command, args, options, process });
      return process;
    },
    (m) => sent.push(m),
    "graft",
    graceMs,
  );
  const events = (name: string) => sent.filter((m) => m.type === "event" && m.event === name);
  type Response = Extract<Message, { type: "response" }>;
  const response = (r: Request) =>
    sent.find((m): m is Response => m.type === "response" && m.request_seq === r.seq);
  return { adapter, sent, spawned, events, response };
}

const LAUNCH = {
  program: "python3", args: ["app.py"], target: "deploy/api", mode: "steal",
  cwd: "/w", env: { A: "1" },
};

test("initialize, launch, output, exit: the session VS Code sees", () => {
  const { adapter, spawned, events, response } = setup();
  const init = request("initialize", { adapterID: "graft" });
  adapter.handle(init);
  assert.equal(response(init)?.success, true);
  assert.equal(events("initialized").length, 1);

  const launch = request("launch", LAUNCH);
  adapter.handle(launch);
  assert.equal(response(launch)?.success, true);
  assert.equal(spawned.length, 1);
  assert.equal(spawned[0].command, "graft");
  assert.deepEqual(spawned[0].args, ["run", "--target", "deploy/api", "--steal", "--", "python3", "app.py"]);
  assert.deepEqual(spawned[0].options, { cwd: "/w", env: { A: "1" } });
  adapter.handle(request("configurationDone"));
  const threads = request("threads");
  adapter.handle(threads);
  assert.deepEqual((response(threads) as { body: unknown }).body, { threads: [] });

  const p = spawned[0].process;
  p.stdout.forEach((l) => l("serving on 8080\n"));
  p.stderr.forEach((l) => l("graft: stealing port 8080\n"));
  const outputs = events("output").map((e) => (e as { body: { category: string; output: string } }).body);
  assert.deepEqual(outputs[0], { category: "console", output: "graft run --target deploy/api --steal -- python3 app.py\n" });
  assert.deepEqual(outputs.slice(1), [
    { category: "stdout", output: "serving on 8080\n" },
    { category: "stderr", output: "graft: stealing port 8080\n" },
  ]);
  p.exit.forEach((l) => l(3, null));
  assert.deepEqual(events("exited").map((e) => (e as { body: unknown }).body), [{ exitCode: 3 }]);
  assert.equal(events("terminated").length, 1);
});

test("stop sends SIGINT and answers once graft has exited; escalates if it does not", async () => {
  const { adapter, spawned, response } = setup(20);
  adapter.handle(request("launch", LAUNCH));
  const p = spawned[0].process;
  const stop = request("disconnect", { terminateDebuggee: true });
  adapter.handle(stop);
  assert.deepEqual(p.signals, ["SIGINT"]);
  assert.equal(response(stop), undefined, "answered before graft exited");
  await new Promise((r) => setTimeout(r, 70));
  assert.deepEqual(p.signals, ["SIGINT", "SIGTERM", "SIGKILL"]);
  p.exit.forEach((l) => l(null, "SIGKILL"));
  assert.equal(response(stop)?.success, true);
});

test("a launch without a target fails with graft's reason, and starts nothing", () => {
  const { adapter, spawned, response } = setup();
  const launch = request("launch", { program: "x" });
  adapter.handle(launch);
  const r = response(launch);
  assert.ok(r && r.type === "response" && !r.success && /no target/.test(r.message ?? ""), JSON.stringify(r));
  assert.equal(spawned.length, 0);
});

test("a graft that cannot start ends the session with a hint", () => {
  const { adapter, spawned, events } = setup();
  adapter.handle(request("launch", LAUNCH));
  spawned[0].process.error.forEach((l) => l(new Error("spawn graft ENOENT")));
  const text = events("output").map((e) => (e as { body: { output: string } }).body.output).join("");
  assert.match(text, /could not start: spawn graft ENOENT.*graft\.path/);
  assert.equal(events("terminated").length, 1);
});

test("quote leaves plain words and quotes the rest", () => {
  assert.equal(quote("deploy/api"), "deploy/api");
  assert.equal(quote("x-user: it's"), `'x-user: it'\\''s'`);
});

/** A stand-in for graft: prints its arguments and a variable, waits for SIGINT, exits 130. */
function fakeGraft(): string {
  const dir = mkdtempSync(join(tmpdir(), "graft-vscode-"));
  const path = join(dir, "graft");
  writeFileSync(
    path,
    "#!/bin/sh\nprintf '%s\\n' \"$@\"\necho \"GRAFT_TEST=$GRAFT_TEST\" >&2\n" +
      "trap 'echo stopped; exit 130' INT\nwhile :; do sleep 0.05; done\n",
  );
  chmodSync(path, 0o755);
  return path;
}

test("with a real process: arguments, environment, output and Ctrl-C", async () => {
  const graft = fakeGraft();
  const sent: Message[] = [];
  let exited!: () => void;
  const done = new Promise<void>((r) => (exited = r));
  const adapter = new GraftAdapter(nodeSpawner, (m) => {
    sent.push(m);
    if (m.type === "event" && m.event === "terminated") exited();
  }, graft);
  adapter.handle(request("launch", { ...LAUNCH, cwd: tmpdir(), env: { GRAFT_TEST: "yes" } }));
  const output = () =>
    sent
      .filter((m) => m.type === "event" && m.event === "output")
      .map((m) => (m as { body: { output: string } }).body.output)
      .join("");
  for (let i = 0; i < 200 && !output().includes("GRAFT_TEST=yes"); i++) {
    await new Promise((r) => setTimeout(r, 25));
  }
  assert.match(output(), /^run\n--target\ndeploy\/api\n--steal\n--\npython3\napp\.py\n/m);
  assert.match(output(), /GRAFT_TEST=yes/);
  const stop = request("terminate");
  adapter.handle(stop);
  await done;
  assert.match(output(), /stopped/);
  const exitedEvent = sent.find((m) => m.type === "event" && m.event === "exited");
  assert.deepEqual((exitedEvent as { body: unknown }).body, { exitCode: 130 });
  assert.ok(sent.some((m) => m.type === "response" && m.request_seq === stop.seq && m.success));
});

test("run reports a command's exit code and refuses a missing one", async () => {
  const ok = await run("sh", ["-c", "echo out; echo err >&2; exit 4"]);
  assert.deepEqual(ok, { code: 4, stdout: "out\n", stderr: "err\n" });
  await assert.rejects(run("/nonexistent/graft", []), /cannot run \/nonexistent\/graft/);
});
