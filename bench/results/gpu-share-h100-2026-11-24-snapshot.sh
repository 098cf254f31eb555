#!/usr/bin/env bash
# H4: the measured source = HEAD + H4's own edits (other helpers' uncommitted work left out).
set -euo pipefail
cd /work/main
snap=$(mktemp -d /tmp/h4snap.XXXX)
git archive HEAD | tar -x -C "$snap"
cp env/warm.py bench/gpu_share.py bench/gpu_share.sh bench/packed_noise.py bench/packed_noise.sh "$snap/bench/" 2>/dev/null || true
cp env/warm.py "$snap/env/warm.py"; rm -f "$snap/bench/warm.py"
python3 - "$snap" <<'PY'
import sys
from pathlib import Path
root = Path(sys.argv[1])
def sub(path, pairs):
    p = root / path; s = p.read_text()
    for old, new in pairs:
        assert s.count(old) == 1, (path, old[:60]); s = s.replace(old, new)
    p.write_text(s)
sub("search_space/target.py", [
 ('"log_mb", "disk_mb"),', '"log_mb", "disk_mb", "pack"),'),
 ('''    disk_mb: int = 4096  # the workspace's size; past it the run fails ("disk quota")
''', '''    disk_mb: int = 4096  # the workspace's size; past it the run fails ("disk quota")
    pack: int = 1

    @property
    def ray_gpus(self) -> float:
        return self.gpus if self.pack == 1 else round(self.gpus / self.pack, 4)
'''),
 ('''        disk_mb=_get(res, "disk_mb", int, "resources", 4096),
    )''', '''        disk_mb=_get(res, "disk_mb", int, "resources", 4096),
        pack=_get(res, "pack", int, "resources", 1),
    )'''),
 ('''        raise TargetError(f"resources: out of range: {resources}")
''', '''        raise TargetError(f"resources: out of range: {resources}")
    if not 1 <= resources.pack <= 16 or (resources.pack > 1 and resources.gpus != 1):
        raise TargetError(f"resources.pack: 1 to 16 runs on one GPU (with gpus = 1), got {resources.pack}")
'''),
])
sub("env/pool.py", [
 ('''    slot = "gpu" + "-".join(gpu_ids) if gpu_ids else f"cpu-{os.getpid()}"
''', '''    slot = "gpu" + "-".join(gpu_ids) if gpu_ids else f"cpu-{os.getpid()}"
    if gpu_ids and spec.target.resources.pack > 1:
        slot += f"-p{os.getpid()}"
'''),
 ('"num_gpus": res.gpus}', '"num_gpus": res.ray_gpus}'),
 ('([int(res.get("GPU", 0) // gpus)] if gpus else [])', '([int(res.get("GPU", 0) / gpus + 1e-6)] if gpus else [])'),
])
sub("agent/loop.py", [
 ('pool.capacity(target.resources.cpus, target.resources.gpus)', 'pool.capacity(target.resources.cpus, target.resources.ray_gpus)'),
 ('Faults(pool, target.resources.cpus, target.resources.gpus)', 'Faults(pool, target.resources.cpus, target.resources.ray_gpus)'),
 ('self.summary.worker_hours * self.target.resources.gpus', 'self.summary.worker_hours * self.target.resources.ray_gpus'),
])
PY
tar -czf build/h4-src.tar.gz -C "$snap" .
cp tests/test_packing.py "$snap/tests/"
echo "$snap"
