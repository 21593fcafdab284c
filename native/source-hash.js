#!/usr/bin/env node
// Hash of every native source and header (sorted paths + contents). The build embeds it in the binary and
// lib/native.ts compares it with the sources beside the package, so a stale binary is refused with a reason.
// Usage: node native/source-hash.js [--header OUT.h]
'use strict';
const fs = require('fs');
const path = require('path');
const crypto = require('crypto');

function nativeFiles(dir) {
  const out = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...nativeFiles(p));
    else if (/\.(h|cc|cu|cuh|json)$/.test(e.name)) out.push(p);
  }
  return out;
}

function sourceHash(root) {
  const nativeDir = path.join(root, 'native');
  const h = crypto.createHash('sha256');
  for (const f of nativeFiles(nativeDir).sort()) {
    h.update(path.relative(root, f).split(path.sep).join('/'));
    h.update('\0');
    h.update(fs.readFileSync(f));
    h.update('\0');
  }
  return h.digest('hex').slice(0, 16);
}

module.exports = { sourceHash };

if (require.main === module) {
  const root = path.resolve(__dirname, '..');
  const hash = sourceHash(root);
  const i = process.argv.indexOf('--header');
  if (i > 0) {
    const out = process.argv[i + 1];
    const text = `#pragma once\n#define TCAL_SOURCE_HASH "${hash}"\n`;
    fs.mkdirSync(path.dirname(out), { recursive: true });
    if (!fs.existsSync(out) || fs.readFileSync(out, 'utf8') !== text) fs.writeFileSync(out, text);
  } else {
    process.stdout.write(hash);
  }
}
