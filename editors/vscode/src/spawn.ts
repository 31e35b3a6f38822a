// Processes for the extension, with node's child_process: the spawner the
// debug adapter runs graft with, and `graft targets -o json` for the target
// picker. No `vscode` API here either.

import { execFile, spawn } from "node:child_process";

import { Spawned, Spawner } from "./adapter";

/** Starts a process with its output piped, its stdin closed. */
export const nodeSpawner: Spawner = (command, args, options) => {
  const child = spawn(command, args, {
    cwd: options.cwd,
    env: { ...process.env, ...(options.env ?? {}) },
    stdio: ["ignore", "pipe", "pipe"],
  });
  child.stdout.setEncoding("utf8");
  child.stderr.setEncoding("utf8");
  const spawned: Spawned = {
    onStdout: (listener) => child.stdout.on("data", listener),
    onStderr: (listener) => child.stderr.on("data", listener),
    // "close", not "exit": every byte of output has been read by then.
    onExit: (listener) => child.on("close", (code, signal) => listener(code, signal)),
    onError: (listener) => child.on("error", listener),
    kill: (signal) => {
      child.kill(signal);
    },
  };
  return spawned;
};

/** The outcome of a finished command. */
export interface Finished {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `command args` to its end (at most `timeoutMs`). */
export function run(command: string, args: string[], timeoutMs = 60_000): Promise<Finished> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { timeout: timeoutMs, maxBuffer: 16 << 20 }, (error, stdout, stderr) => {
      if (error && typeof error.code === "string") {
        reject(new Error(`cannot run ${command}: ${error.message}`));
        return;
      }
      resolve({ code: error ? Number(error.code ?? 1) : 0, stdout, stderr });
    });
  });
}
