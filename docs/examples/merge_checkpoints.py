"""Average the last checkpoints of a training run on disk, in bounded memory.

Run: python docs/examples/merge_checkpoints.py
"""

import os
import shutil
import tempfile

import ml_dtypes
import numpy as np

import polyak
import polyak.safetensors as pst

folder = tempfile.mkdtemp(prefix="polyak-example-")
rng = np.random.default_rng(0)

# A stand-in for a training run: one checkpoint per epoch, the oldest first.
paths = []
for epoch in range(1, 6):
    params = {
        "encoder": {"weight": rng.standard_normal((256, 256)).astype(np.float32)},
        "head": {"weight": rng.standard_normal((10, 256)).astype(ml_dtypes.bfloat16)},
        "step": np.int64(1000 * epoch),
    }
    path = os.path.join(folder, f"epoch_{epoch}.safetensors")
    pst.save(params, path, {"format": "np"})  # nested keys become "encoder.weight", ...
    paths.append(path)

# Newer checkpoints weigh more; the merge streams tensor by tensor and never loads a whole
# checkpoint, so the same call works for models far larger than memory.
report = pst.merge(paths, os.path.join(folder, "averaged.safetensors"), "linear")
print(report)

# The merge equals the in-memory average bit for bit.
merged = pst.load(os.path.join(folder, "averaged.safetensors"), nested=True)
expected = polyak.average([pst.load(p, nested=True) for p in paths], "linear")
assert merged["encoder"]["weight"].tobytes() == expected["encoder"]["weight"].tobytes()
assert merged["head"]["weight"].dtype == ml_dtypes.bfloat16
assert int(merged["step"]) == 5000  # integer leaves take the newest value
print("weights used (oldest first):", [round(w, 3) for w in report.weights])
shutil.rmtree(folder)
