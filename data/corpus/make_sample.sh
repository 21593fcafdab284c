#!/usr/bin/env bash
# Rebuilds data/corpus/python-stdlib-sample.txt and LICENSE-PSF.txt from the Python installation that
# `python3` (or $PYTHON) runs: the standard library's top-level *.py modules, in byte order of their names,
# each preceded by a header line, until the next file would take the sample past $MAX_BYTES (default 3 MB).
# Deterministic for a given Python version: the same installation gives the same bytes.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
MAX_BYTES="${MAX_BYTES:-3000000}"
"$PYTHON" - "$MAX_BYTES" <<'PY'
import os, sys, sysconfig, platform, shutil

max_bytes = int(sys.argv[1])
stdlib = sysconfig.get_paths()["stdlib"]
names = sorted((n for n in os.listdir(stdlib) if n.endswith(".py")), key=lambda n: n.encode("utf-8"))
out, total, used = [], 0, []
for name in names:
    with open(os.path.join(stdlib, name), "rb") as f:
        body = f.read()
    body.decode("utf-8")  # every stdlib source is UTF-8; fail loudly if not
    if not body.endswith(b"\n"):
        body += b"\n"
    header = f"# ===== file: Lib/{name} (CPython {platform.python_version()}) =====\n".encode("utf-8")
    if total + len(header) + len(body) > max_bytes:
        break
    out += [header, body]
    total += len(header) + len(body)
    used.append(name)
with open("python-stdlib-sample.txt.tmp", "wb") as f:
    f.write(b"".join(out))
os.replace("python-stdlib-sample.txt.tmp", "python-stdlib-sample.txt")

for lic in (os.path.join(stdlib, "LICENSE.txt"), os.path.join(sys.prefix, "LICENSE.txt"), os.path.join(sys.prefix, "LICENSE")):
    if os.path.isfile(lic):
        shutil.copyfile(lic, "LICENSE-PSF.txt")
        break
else:
    sys.exit("no LICENSE.txt found in " + stdlib + " or " + sys.prefix)
print(f"CPython {platform.python_version()} from {stdlib}: {len(used)} modules, {used[0]} .. {used[-1]}, {total} bytes")
PY
sha256sum python-stdlib-sample.txt LICENSE-PSF.txt
