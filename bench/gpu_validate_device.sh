#!/usr/bin/env bash
# One command on a lent H100/H200 (the device tool, or any machine with an NVIDIA GPU and CUDA torch):
# install the carried wheels, run bench/gpu_validate.py against the GPU, leave the results in $OUT.
#
# Prepare here (once; the wheels travel with the working tree, ~1.4 MB):
#     bench/gpu_validate_device.sh --fetch-wheels
# Then, through the device tool (timeout_s 600 leaves room: the run takes ~4-5 minutes):
#     run(command="bash bench/gpu_validate_device.sh", carry=[".whl"], timeout_s=600)
# Results in $OUT: gpu-validate.json, gpu-validate.md (the section for bench/RESULTS.md), calibrated.yaml
# (for configs/hardware/), log.txt, nvidia-smi.txt, traces.tar.gz (steps.jsonl/energy.jsonl of every run).
# See docs/gpu-validation.md.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PYTHON=${PYTHON:-python3}  # the H200 image's python3 holds CUDA torch

if [ "${1:-}" = "--fetch-wheels" ]; then
    # Packages the H200 image lacks (KINDS.md), for its Python 3.12: msgspec (wattprint), pyzmq (wattprint's
    # transport; not imported by the validation, carried so the sidecar can be tried too), zeus (ZeusMonitor;
    # its other needs - numpy, scipy, scikit-learn, httpx, nvidia-ml-py, ... - are in the image).
    grep -qxF "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" \
        msgspec==0.23.0 pyzmq==27.3.0 zeus==0.16.0
fi

OUTDIR=${OUT:-gpu-validate-out}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d /tmp/gpu-validate.XXXXXX)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$WORK/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1
"$PYTHON" - <<'EOF' >> "$OUTDIR/nvidia-smi.txt" 2>&1
import torch, numpy, msgspec
print("torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__, "msgspec", msgspec.__version__)
try:
    import zeus
    print("zeus", getattr(zeus, "__version__", "?"))
except Exception as exc:
    print("zeus not importable:", exc)
EOF

"$PYTHON" bench/gpu_validate.py --meter nvml --out "$OUTDIR/gpu-validate.json" --workdir "$WORK/run" \
    --results-md "$OUTDIR/gpu-validate.md" "$@" 2>&1 | tee "$OUTDIR/log.txt"
rc=${PIPESTATUS[0]}
[ -f "$WORK/run/calibrated.yaml" ] && cp "$WORK/run/calibrated.yaml" "$OUTDIR/calibrated.yaml"
tar czf "$OUTDIR/traces.tar.gz" -C "$WORK" run 2>/dev/null
rm -rf "$WORK"
exit "$rc"
