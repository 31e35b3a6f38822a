// Copies the graft.toml JSON Schema of the repository (docs/graft.schema.json,
// written by `graft config schema`) into the extension, which ships it for
// contributes.tomlValidation / jsonValidation / yamlValidation.
"use strict";
const fs = require("node:fs");
const path = require("node:path");

const source = path.join(__dirname, "..", "..", "..", "docs", "graft.schema.json");
const target = path.join(__dirname, "..", "schemas", "graft.schema.json");
fs.mkdirSync(path.dirname(target), { recursive: true });
fs.copyFileSync(source, target);
