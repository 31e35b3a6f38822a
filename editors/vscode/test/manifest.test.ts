// Tests of package.json against the code: the schema contributions point at
// the schema graft prints (`graft config schema`, copied from
// docs/graft.schema.json by the build), and every contributed command is
// registered by extension.ts.

import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

const root = join(__dirname, "..", "..");
const manifest = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const schema = JSON.parse(readFileSync(join(root, "schemas", "graft.schema.json"), "utf8"));

test("the schema contributions name graft's schema", () => {
  const c = manifest.contributes;
  assert.equal(c.tomlValidation[0].url, schema.$id);
  assert.equal(c.tomlValidation[0].fileMatch, "graft.toml");
  for (const v of [c.jsonValidation[0], c.yamlValidation[0]]) {
    assert.ok(existsSync(join(root, v.url)), `${v.url} is not in the extension`);
  }
  assert.equal(schema.title, "graft.toml");
  assert.ok(schema.properties.incoming && schema.properties.kube, "not graft's schema");
});

test("every contributed command is registered", () => {
  const source = readFileSync(join(root, "src", "extension.ts"), "utf8");
  for (const { command } of manifest.contributes.commands) {
    assert.ok(source.includes(`registerCommand("${command}"`), `${command} is not registered`);
  }
  assert.equal(manifest.contributes.debuggers[0].type, "graft");
  assert.ok(source.includes('registerDebugAdapterDescriptorFactory("graft"'));
});
