// The `graft` debug type's adapter: a minimal Debug Adapter Protocol server
// (https://microsoft.github.io/debug-adapter-protocol/specification) that
// runs `graft run … -- program args` for a launch request, forwards its
// output as `output` events, stops it (SIGINT, as Ctrl-C: graft ends the
// session and gives the target back) on `disconnect`/`terminate`, and ends
// the session when graft exits. No breakpoints: graft runs the program, a
// debugger does not. The process is started through an injected `Spawner`
// and messages leave through an injected `send`, so this file does not use
// the `vscode` API and is tested alone.

import { GraftLaunch, runArgs } from "./logic";

/** A DAP request. */
export interface Request {
  seq: number;
  type: "request";
  command: string;
  arguments?: unknown;
}

/** A DAP response or event, as this adapter sends them. */
export type Message =
  | {
      seq: number;
      type: "response";
      request_seq: number;
      command: string;
      success: boolean;
      message?: string;
      body?: unknown;
    }
  | { seq: number; type: "event"; event: string; body?: unknown };

/** A started process, as the adapter needs it. */
export interface Spawned {
  onStdout(listener: (text: string) => void): void;
  onStderr(listener: (text: string) => void): void;
  /** Called once: the exit code, or null with the signal that ended it. */
  onExit(listener: (code: number | null, signal: string | null) => void): void;
  /** Called when the process could not start (no such file, …). */
  onError(listener: (error: Error) => void): void;
  kill(signal: "SIGINT" | "SIGTERM" | "SIGKILL"): void;
}

/** Starts `command args` in `cwd` with `env` added to the environment. */
export type Spawner = (
  command: string,
  args: string[],
  options: { cwd?: string; env?: Record<string, string> },
) => Spawned;

/** How long graft gets after SIGINT to end its session before SIGTERM, then SIGKILL. */
export const STOP_GRACE_MS = 15_000;

/** One debug session of type `graft`. */
export class GraftAdapter {
  private seq = 1;
  private process: Spawned | undefined;
  private exited = false;
  private pendingStops: Request[] = [];
  private timers: ReturnType<typeof setTimeout>[] = [];

  constructor(
    private readonly spawner: Spawner,
    private readonly send: (message: Message) => void,
    private readonly defaultGraft: string,
    private readonly graceMs: number = STOP_GRACE_MS,
  ) {}

  /** Handles one request from the editor. */
  handle(request: Request): void {
    switch (request.command) {
      case "initialize":
        this.respond(request, true, {
          supportsConfigurationDoneRequest: true,
          supportsTerminateRequest: true,
          supportTerminateDebuggee: true,
        });
        this.event("initialized");
        return;
      case "launch":
        this.launch(request);
        return;
      case "threads":
        this.respond(request, true, { threads: [] });
        return;
      case "setBreakpoints":
        this.respond(request, true, { breakpoints: [] });
        return;
      case "disconnect":
      case "terminate":
        this.stop(request);
        return;
      default:
        this.respond(request, true);
    }
  }

  /** Kills graft at once if it still runs (the editor went away). */
  dispose(): void {
    this.timers.forEach(clearTimeout);
    if (this.process && !this.exited) this.process.kill("SIGKILL");
  }

  private launch(request: Request): void {
    const launch = (request.arguments ?? {}) as GraftLaunch;
    let args: string[];
    try {
      args = runArgs(launch);
    } catch (e) {
      this.respond(request, false, undefined, (e as Error).message);
      return;
    }
    const graft = launch.graftPath || this.defaultGraft;
    this.output("console", `${graft} ${args.map(quote).join(" ")}\n`);
    const child = this.spawner(graft, args, { cwd: launch.cwd, env: launch.env });
    this.process = child;
    child.onStdout((text) => this.output("stdout", text));
    child.onStderr((text) => this.output("stderr", text));
    child.onError((error) => {
      this.output("stderr", `graft could not start: ${error.message} (set graft.path or "graftPath")\n`);
      this.finished(127);
    });
    child.onExit((code, signal) => {
      if (signal) this.output("console", `graft ended by ${signal}\n`);
      this.finished(code ?? 128);
    });
    this.respond(request, true);
  }

  private stop(request: Request): void {
    if (!this.process || this.exited) {
      this.respond(request, true);
      return;
    }
    this.pendingStops.push(request);
    if (this.pendingStops.length > 1) return;
    // Ctrl-C: graft ends the session, gives the target's ports back, exits.
    this.process.kill("SIGINT");
    const process = this.process;
    this.timers.push(
      setTimeout(() => {
        if (!this.exited) process.kill("SIGTERM");
      }, this.graceMs),
      setTimeout(() => {
        if (!this.exited) process.kill("SIGKILL");
      }, 2 * this.graceMs),
    );
  }

  private finished(code: number): void {
    if (this.exited) return;
    this.exited = true;
    this.timers.forEach(clearTimeout);
    this.event("exited", { exitCode: code });
    this.event("terminated");
    for (const request of this.pendingStops.splice(0)) this.respond(request, true);
  }

  private output(category: "console" | "stdout" | "stderr", output: string): void {
    this.event("output", { category, output });
  }

  private event(event: string, body?: unknown): void {
    this.send({ seq: this.seq++, type: "event", event, body });
  }

  private respond(request: Request, success: boolean, body?: unknown, message?: string): void {
    this.send({
      seq: this.seq++,
      type: "response",
      request_seq: request.seq,
      command: request.command,
      success,
      message,
      body,
    });
  }
}

/** A word as a shell would need it, for the command line shown. */
export function quote(word: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}
