#!/usr/bin/env bash
# The layer format end to end on real files: Python's standard library becomes an optimized eStargz
# layer whose first bytes hold exactly the modules `import json, http.client, email` reads, then it is
# verified by us and by the reference (upstream estargz), listed, extracted and compared byte for byte.
set -euo pipefail
out=${1:-$(mktemp -d /tmp/lazybuild-demo.XXXXXX)}
mkdir -p "$out"
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

echo "== 1. a layer tar of real files: $stdlib"
tar --sort=name --exclude=__pycache__ --exclude=site-packages -C "$stdlib" -cf "$out/stdlib.tar" .
du -h "$out/stdlib.tar" | cut -f1

echo "== 2. the files a workload reads first (import json, http.client, email)"
python3 - "$stdlib" > "$out/prioritized.txt" <<'PY'
import os, sys
root = sys.argv[1]
import json, http.client, email  # noqa: E401  the workload
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if f and f.startswith(root + "/") and "site-packages" not in f:
        print(os.path.relpath(f, root))
PY
wc -l < "$out/prioritized.txt"

echo "== 3. convert: gzip eStargz (prioritized files first, then .prefetch.landmark) and zstd"
lazybuild layer convert --format json "$out/stdlib.tar" "$out/stdlib.esgz" --prioritized-files "$out/prioritized.txt" | tee "$out/gzip.json"
lazybuild layer convert --format json "$out/stdlib.tar" "$out/stdlib.zst" --zstd --prioritized-files "$out/prioritized.txt" | tee "$out/zstd.json"
toc() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tocDigest"])' "$1"; }

echo "== 4. verify: ours, then the reference library, against the TOC digest annotation"
for f in esgz zst; do
  j=$out/$([ $f = esgz ] && echo gzip || echo zstd).json
  lazybuild layer verify "$out/stdlib.$f" --toc-digest "$(toc "$j")"
  if command -v estargz-oracle >/dev/null; then
    estargz-oracle verify -toc "$(toc "$j")" "$out/stdlib.$f" > "$out/oracle-$f.txt" 2>/dev/null
    echo "reference: $(wc -l < "$out/oracle-$f.txt") entries verified in stdlib.$f"
  fi
done

echo "== 5. the prefetch range: one Range request [0, .prefetch.landmark) warms the workload"
lazybuild layer ls --format json "$out/stdlib.esgz" | python3 -c '
import json, os, sys
es = json.load(sys.stdin)
mark = next(e for e in es if e["path"] == ".prefetch.landmark")["offset"]
size = os.path.getsize(sys.argv[1])
warm = sum(1 for e in es if e["type"] == "reg" and e.get("offset", size) < mark)
print(f"prefetch range: {mark} of {size} bytes ({100 * mark / size:.1f}%) holds the {warm} files the workload reads")
' "$out/stdlib.esgz"
lazybuild layer ls "$out/stdlib.esgz" | head -n 8

echo "== 6. extract (every chunk verified) and compare with the source tree"
lazybuild layer extract "$out/stdlib.esgz" "$out/extracted" --toc-digest "$(toc "$out/gzip.json")"
mkdir -p "$out/source" && tar -C "$out/source" -xf "$out/stdlib.tar"
rm -f "$out/extracted/.prefetch.landmark"
diff -r --no-dereference "$out/source" "$out/extracted" && echo "extracted tree is identical to the source"
echo "demo output in $out"
