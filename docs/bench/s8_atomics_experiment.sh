#!/bin/bash
# Atomic-cost experiment: time the split MLP scan with some atomics turned into plain stores
# (wrong numbers, timing only), against the unmodified kernel.
set -x
F=olmo_miras_plugin/memory/triton_mlp_split.py
cp $F /tmp/orig.py
B="python scripts/bench_memory.py --scan-only --impl triton_graphed --seq 4096 16384"
$B --json $OUT/base.json 2>&1 | grep -v Warning | tail -8
# bwd: dq, dk, xe, de
python - <<'PY'
import re
s=open('/tmp/orig.py').read()
lines=s.split('\n')
for i,l in enumerate(lines):
    if 'tl.atomic_add(' in l and any(p in l for p in ('dq_ptr','dk_ptr','xe_ptr','de_ptr')):
        lines[i]=l.replace('tl.atomic_add(','tl.store(').replace(', sem="relaxed"','')
open('olmo_miras_plugin/memory/triton_mlp_split.py','w').write('\n'.join(lines))
PY
grep -n "tl.store(d[qke]_ptr\|tl.store(xe_ptr" $F
$B --json $OUT/bwd_store.json 2>&1 | grep -v Warning | tail -8
python - <<'PY'
s=open('/tmp/orig.py').read()
lines=s.split('\n')
for i,l in enumerate(lines):
    if 'tl.atomic_add(' in l and any(p in l for p in ('pk_ptr','y_ptr')):
        lines[i]=l.replace('tl.atomic_add(','tl.store(').replace(', sem="relaxed"','')
open('olmo_miras_plugin/memory/triton_mlp_split.py','w').write('\n'.join(lines))
PY
$B --json $OUT/fwd_store.json 2>&1 | grep -v Warning | tail -8
cp /tmp/orig.py $F
