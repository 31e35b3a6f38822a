// The extension's logic without the `vscode` API, so node's test runner
// tests it alone: the `graft run` command line of a launch configuration, the
// command of another debugger's launch configuration (node, python, go, a
// native program), the quick-pick items from `graft targets -o json`
// (docs/json-output.md), and the status-bar text of a session.

/** A `graft` launch configuration (package.json, contributes.debuggers). */
export interface GraftLaunch {
  program: string;
  args?: string[];
  cwd?: string;
  env?: Record<string, string>;
  target?: string;
  namespace?: string;
  context?: string;
  kubeconfig?: string;
  mode?: "mirror" | "steal";
  filterHeader?: string[];
  filterPath?: string[];
  filterMethod?: string[];
  agentMode?: "ephemeral" | "node";
  config?: string;
  graftArgs?: string[];
  graftPath?: string;
}

/** Kubernetes access flags shared by `graft run` and `graft targets`. */
export function kubeArgs(launch: Pick<GraftLaunch, "namespace" | "context" | "kubeconfig">): string[] {
  const out: string[] = [];
  if (launch.namespace) out.push("-n", launch.namespace);
  if (launch.context) out.push("--context", launch.context);
  if (launch.kubeconfig) out.push("--kubeconfig", launch.kubeconfig);
  return out;
}

/** `graft targets … -o json`. */
export function targetsArgs(launch: Pick<GraftLaunch, "namespace" | "context" | "kubeconfig">): string[] {
  return ["targets", ...kubeArgs(launch), "-o", "json"];
}

/**
 * The arguments of `graft` for a launch: `run --target T [flags] -- program
 * args…`. Throws when the launch has no program or no target.
 */
export function runArgs(launch: GraftLaunch): string[] {
  if (!launch.program) {
    throw new Error("the launch configuration has no program");
  }
  if (!launch.target) {
    throw new Error("no target: set \"target\" in the launch configuration or pick one");
  }
  const out = ["run", "--target", launch.target, ...kubeArgs(launch)];
  if (launch.mode === "steal") out.push("--steal");
  if (launch.mode === "mirror") out.push("--mirror");
  for (const re of launch.filterHeader ?? []) out.push("--filter-header", re);
  for (const re of launch.filterPath ?? []) out.push("--filter-path", re);
  for (const m of launch.filterMethod ?? []) out.push("--filter-method", m);
  if (launch.agentMode) out.push("--agent-mode", launch.agentMode);
  if (launch.config) out.push("--config", launch.config);
  out.push(...(launch.graftArgs ?? []));
  out.push("--", launch.program, ...(launch.args ?? []));
  return out;
}

/** One entry of `graft targets -o json` (docs/json-output.md). */
export interface TargetJson {
  target: string;
  kind: string;
  name: string;
  namespace: string;
  ready: number;
  desired: number;
  containers: string[];
}

/** A quick-pick entry. */
export interface TargetItem {
  label: string;
  description: string;
  detail?: string;
  target: string;
}

/**
 * The quick-pick items of `graft targets -o json`'s stdout: one per target,
 * one more per container of a pod with several, then `targetless`. Throws
 * when the output is not that document.
 */
export function parseTargets(stdout: string): TargetItem[] {
  let doc: unknown;
  try {
    doc = JSON.parse(stdout);
  } catch (e) {
    throw new Error(`graft targets printed no JSON: ${(e as Error).message}`);
  }
  const targets = (doc as { targets?: unknown }).targets;
  if (!Array.isArray(targets)) {
    throw new Error("graft targets printed JSON without a \"targets\" list");
  }
  const items: TargetItem[] = [];
  for (const t of targets as TargetJson[]) {
    if (typeof t.target !== "string") continue;
    const ready = `${t.ready}/${t.desired} ready`;
    items.push({
      label: t.target,
      description: `${t.kind} · ${ready}`,
      detail: t.containers?.length ? `containers: ${t.containers.join(", ")}` : undefined,
      target: t.target,
    });
    if (t.containers && t.containers.length > 1) {
      for (const c of t.containers) {
        items.push({
          label: `${t.target}/container/${c}`,
          description: `container ${c} of ${t.kind} ${t.name}`,
          target: `${t.target}/container/${c}`,
        });
      }
    }
  }
  items.push({
    label: "targetless",
    description: "no pod: outgoing traffic, names and no incoming traffic",
    target: "targetless",
  });
  return items;
}

/** The filter as graft prints it (`header~"x-user: a" and method=GET`). */
export function filterText(launch: GraftLaunch): string | undefined {
  const rules = [
    ...(launch.filterHeader ?? []).map((re) => `header~${JSON.stringify(re)}`),
    ...(launch.filterPath ?? []).map((re) => `path~${JSON.stringify(re)}`),
    ...(launch.filterMethod ?? []).map((m) => `method=${m}`),
  ];
  return rules.length ? rules.join(" and ") : undefined;
}

/** The status-bar text and tooltip of a running session. */
export function statusText(launch: GraftLaunch): { text: string; tooltip: string } {
  const mode = launch.mode ?? "mirror";
  const filter = filterText(launch);
  const target = launch.target ?? "?";
  const ns = launch.namespace ? ` in ${launch.namespace}` : "";
  return {
    text: `$(plug) graft: ${target} · ${mode}${filter ? ` · ${filter}` : ""}`,
    tooltip:
      `graft: ${launch.program} runs as if in ${target}${ns}, ${mode === "steal" ? "stealing" : "mirroring"} ` +
      `its incoming traffic${filter ? ` matching ${filter}` : ""}. Click to stop.`,
  };
}

/** What `${…}` variables expand to. */
export interface Vars {
  workspaceFolder?: string;
  file?: string;
  env: Record<string, string | undefined>;
}

/** Expands `${workspaceFolder}`, `${file}`, `${env:NAME}`; others stay. */
export function substitute(text: string, vars: Vars): string {
  return text.replace(/\$\{([^}]+)\}/g, (whole, name: string) => {
    if (name === "workspaceFolder" && vars.workspaceFolder !== undefined) return vars.workspaceFolder;
    if (name === "file" && vars.file !== undefined) return vars.file;
    if (name.startsWith("env:")) return vars.env[name.slice(4)] ?? "";
    return whole;
  });
}

/** A launch configuration of any debugger, as launch.json holds it. */
export type DebugConfig = Record<string, unknown> & { type: string; name: string };

function strings(value: unknown): string[] {
  return Array.isArray(value) ? value.filter((v): v is string => typeof v === "string") : [];
}

function str(value: unknown): string | undefined {
  return typeof value === "string" && value !== "" ? value : undefined;
}

/**
 * The local command a launch configuration of another debugger starts, as a
 * `graft` launch (target unset): node and python run their interpreter on
 * `program`, go runs `go run`, a native debugger (cppdbg, lldb, gdb) runs
 * `program` itself. Throws when the configuration names no program.
 */
export function launchOf(config: DebugConfig, vars: Vars): GraftLaunch {
  const sub = (s: string) => substitute(s, vars);
  const program = str(config.program) ?? str(config.module);
  const args = strings(config.args).map(sub);
  const env: Record<string, string> = {};
  if (config.env && typeof config.env === "object") {
    for (const [k, v] of Object.entries(config.env as Record<string, unknown>)) {
      if (typeof v === "string") env[k] = sub(v);
    }
  }
  const cwd = str(config.cwd) ? sub(config.cwd as string) : vars.workspaceFolder;
  let command: string[];
  switch (config.type) {
    case "graft":
      return {
        ...(config as unknown as GraftLaunch),
        program: sub(String(config.program ?? "")),
        args,
        cwd,
        env,
      };
    case "node":
    case "pwa-node": {
      if (!program) throw new Error(`launch configuration "${config.name}" has no program`);
      const runtime = str(config.runtimeExecutable) ?? "node";
      command = [runtime, ...strings(config.runtimeArgs).map(sub), sub(program)];
      break;
    }
    case "python":
    case "debugpy": {
      const python = str(config.python) ?? "python3";
      if (str(config.module)) {
        command = [python, "-m", config.module as string];
      } else if (program) {
        command = [python, sub(program)];
      } else {
        throw new Error(`launch configuration "${config.name}" has no program or module`);
      }
      break;
    }
    case "go": {
      if (!program) throw new Error(`launch configuration "${config.name}" has no program`);
      command = ["go", "run", sub(program)];
      break;
    }
    default: {
      if (!program) throw new Error(`launch configuration "${config.name}" has no program`);
      command = [sub(program)];
    }
  }
  return { program: command[0], args: [...command.slice(1), ...args], cwd, env };
}

/** The Even Better TOML association pattern for every `graft.toml`. */
export const GRAFT_TOML_PATTERN = "(^|/)graft\\.toml$";

/**
 * Even Better TOML's `evenBetterToml.schema.associations` (a map from a path
 * regex to a schema URL) with `graft.toml` pointed at `schemaUri`, the other
 * entries kept.
 */
export function schemaAssociations(
  existing: Record<string, string> | undefined,
  schemaUri: string,
): Record<string, string> {
  return { ...(existing ?? {}), [GRAFT_TOML_PATTERN]: schemaUri };
}
