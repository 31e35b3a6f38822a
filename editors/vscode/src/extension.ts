// The VS Code side: registers the `graft` debug type (its configuration
// provider picks a target when the launch has none, its adapter is
// `GraftAdapter` in this process), the command that runs the program of the
// current launch configuration under graft, and the status-bar item that
// shows a running session and stops it. Everything that can be decided
// without the editor lives in logic.ts, adapter.ts and spawn.ts.

import * as vscode from "vscode";

import { GraftAdapter, Message } from "./adapter";
import {
  DebugConfig,
  GraftLaunch,
  launchOf,
  parseTargets,
  schemaAssociations,
  statusText,
  targetsArgs,
} from "./logic";
import { nodeSpawner, run } from "./spawn";

function settings() {
  const c = vscode.workspace.getConfiguration("graft");
  return {
    graft: c.get<string>("path") || "graft",
    mode: c.get<"mirror" | "steal">("mode") ?? "mirror",
    namespace: c.get<string>("namespace") || undefined,
  };
}

/** Asks `graft targets -o json` and lets the user pick one. */
async function pickTarget(launch: GraftLaunch): Promise<string | undefined> {
  const graft = launch.graftPath || settings().graft;
  const items = await vscode.window.withProgress(
    { location: vscode.ProgressLocation.Window, title: "graft: listing targets" },
    async () => {
      const done = await run(graft, targetsArgs(launch));
      if (done.code !== 0) {
        throw new Error(done.stderr.trim() || `graft targets exited with code ${done.code}`);
      }
      return parseTargets(done.stdout);
    },
  );
  const ns = launch.namespace ? ` in ${launch.namespace}` : "";
  const picked = await vscode.window.showQuickPick(items, {
    title: `graft: run ${launch.program} as if in…`,
    placeHolder: `a target${ns}`,
    matchOnDescription: true,
  });
  return picked?.target;
}

class Provider implements vscode.DebugConfigurationProvider {
  async resolveDebugConfiguration(
    _folder: vscode.WorkspaceFolder | undefined,
    config: vscode.DebugConfiguration,
  ): Promise<vscode.DebugConfiguration | undefined> {
    if (!config.type && !config.request && !config.name) {
      return undefined; // no launch.json: nothing to guess for a whole program
    }
    const launch = config as unknown as GraftLaunch;
    launch.namespace ??= settings().namespace;
    if (!launch.target) {
      try {
        launch.target = await pickTarget(launch);
      } catch (e) {
        void vscode.window.showErrorMessage(`graft: ${(e as Error).message}`);
        return undefined;
      }
      if (!launch.target) return undefined; // the pick was dismissed
    }
    return config;
  }
}

class Factory implements vscode.DebugAdapterDescriptorFactory {
  createDebugAdapterDescriptor(): vscode.DebugAdapterDescriptor {
    const sent = new vscode.EventEmitter<vscode.DebugProtocolMessage>();
    const adapter = new GraftAdapter(nodeSpawner, (m: Message) => sent.fire(m), settings().graft);
    return new vscode.DebugAdapterInlineImplementation({
      onDidSendMessage: sent.event,
      handleMessage: (m) => adapter.handle(m as Parameters<GraftAdapter["handle"]>[0]),
      dispose: () => {
        adapter.dispose();
        sent.dispose();
      },
    });
  }
}

/** The launch configurations of the workspace folder (or the workspace). */
function launchConfigurations(folder: vscode.WorkspaceFolder | undefined): DebugConfig[] {
  const configs = vscode.workspace.getConfiguration("launch", folder?.uri).get<unknown[]>("configurations") ?? [];
  return configs.filter(
    (c): c is DebugConfig =>
      !!c && typeof c === "object" && typeof (c as DebugConfig).name === "string",
  );
}

/** `graft: Run launch configuration in a target`. */
async function runInTarget(): Promise<void> {
  const folder =
    vscode.workspace.getWorkspaceFolder(vscode.window.activeTextEditor?.document.uri ?? vscode.Uri.file("/")) ??
    vscode.workspace.workspaceFolders?.[0];
  const configs = launchConfigurations(folder);
  let chosen: DebugConfig | undefined;
  if (configs.length === 0) {
    void vscode.window.showErrorMessage("graft: no launch configuration in .vscode/launch.json");
    return;
  }
  if (configs.length === 1) {
    chosen = configs[0];
  } else {
    const picked = await vscode.window.showQuickPick(
      configs.map((c) => ({ label: c.name, description: c.type, config: c })),
      { title: "graft: which launch configuration's program?" },
    );
    chosen = picked?.config;
  }
  if (!chosen) return;
  let launch: GraftLaunch;
  try {
    launch = launchOf(chosen, {
      workspaceFolder: folder?.uri.fsPath,
      file: vscode.window.activeTextEditor?.document.uri.fsPath,
      env: process.env,
    });
  } catch (e) {
    void vscode.window.showErrorMessage(`graft: ${(e as Error).message}`);
    return;
  }
  const s = settings();
  const config: vscode.DebugConfiguration = {
    ...launch,
    type: "graft",
    request: "launch",
    name: `graft: ${chosen.name}`,
    mode: launch.mode ?? s.mode,
    namespace: launch.namespace ?? s.namespace,
  };
  await vscode.debug.startDebugging(folder, config);
}

export function activate(context: vscode.ExtensionContext): void {
  const status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Left, 10);
  status.command = "graft.stop";
  const sessions: vscode.DebugSession[] = [];
  const show = () => {
    const current = sessions[sessions.length - 1];
    if (!current) {
      status.hide();
      return;
    }
    const { text, tooltip } = statusText(current.configuration as unknown as GraftLaunch);
    status.text = sessions.length > 1 ? `${text} (+${sessions.length - 1})` : text;
    status.tooltip = tooltip;
    status.show();
  };
  context.subscriptions.push(
    status,
    vscode.debug.registerDebugConfigurationProvider("graft", new Provider()),
    vscode.debug.registerDebugAdapterDescriptorFactory("graft", new Factory()),
    vscode.commands.registerCommand("graft.runInTarget", runInTarget),
    // Even Better TOML fetches the schema of contributes.tomlValidation from
    // its URL; offline, this points it at the copy in the extension instead.
    vscode.commands.registerCommand("graft.useBundledSchema", async () => {
      const uri = vscode.Uri.joinPath(context.extensionUri, "schemas", "graft.schema.json").toString();
      const toml = vscode.workspace.getConfiguration("evenBetterToml");
      const current = toml.get<Record<string, string>>("schema.associations");
      await toml.update("schema.associations", schemaAssociations(current, uri), vscode.ConfigurationTarget.Workspace);
      void vscode.window.showInformationMessage(`graft: graft.toml is checked against ${uri}`);
    }),
    vscode.commands.registerCommand("graft.stop", async () => {
      const current = sessions[sessions.length - 1];
      if (current) await vscode.debug.stopDebugging(current);
    }),
    vscode.debug.onDidStartDebugSession((s) => {
      if (s.type === "graft") {
        sessions.push(s);
        show();
      }
    }),
    vscode.debug.onDidTerminateDebugSession((s) => {
      const i = sessions.indexOf(s);
      if (i >= 0) {
        sessions.splice(i, 1);
        show();
      }
    }),
  );
}

export function deactivate(): void {}
