#!/bin/bash
# The GPU checks, for a machine with CUDA: the whole test suite with CUDA present (the CUDA tests skip
# elsewhere), then CPU-vs-CUDA comparisons of merge, quantize and extract outputs and of validate's
# verdicts, on the fixtures and on a generated 0.1B model.
#     bash benchmarks/gpu_checks.sh          # JSON reports land in $OUT (default /tmp/loratools-gpu)
# Needs torch with CUDA, transformers, peft and bitsandbytes importable, and loratools on PYTHONPATH.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/loratools-gpu}; mkdir -p "$OUT"
GPU=${GPU:-cuda}; export GPU  # GPU=cpu runs the script end to end on a machine without one (a smoke test)
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, transformers, peft, bitsandbytes, safetensors, click, rich; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'tf', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"
if [ -z "$SKIP_TESTS" ]; then
  echo "== tests (all, CUDA present)"
  timeout 330 python3 -m pytest -q -rs -p no:cacheprovider --durations=8 tests 2>&1 | tail -40
fi
echo "== CLI on GPU"
W=/tmp/g; mkdir -p $W
L="python3 -m loratools"
python3 - <<'PY'
import sys; sys.path.insert(0, "benchmarks")
from pathlib import Path
from common import generate_llama, generate_lora
generate_llama(Path("/tmp/g/base01"), "0.1b")
generate_lora(Path("/tmp/g/lora01"), "0.1b", r=16)
PY
for d in cpu $GPU; do
  /usr/bin/time -f "merge $d %e s %M KB" $L merge /tmp/g/base01 /tmp/g/lora01 -o $W/m01-$d --device $d --force >/dev/null
  /usr/bin/time -f "quantize $d %e s %M KB" $L quantize /tmp/g/base01 -o $W/q01-$d --nf4 --device $d --force >/dev/null
  /usr/bin/time -f "quantize-fixture $d %e s" $L quantize fixtures/tiny-llama -o $W/qf-$d --nf4 --device $d --force >/dev/null
  /usr/bin/time -f "extract $d %e s" $L extract fixtures/tiny-llama fixtures/tiny-llama-tuned -o $W/x-$d --rank 8 --device $d --force --report $W/x-$d.json >/dev/null
done
python3 - <<'PY'
import json, os
import torch
from loratools.io import Checkpoint
G = os.environ["GPU"]
def cmp(a, b, label):
    if os.path.exists(os.path.join(a, "adapter_model.safetensors")):  # an adapter: its one weight file
        a, b = os.path.join(a, "adapter_model.safetensors"), os.path.join(b, "adapter_model.safetensors")
    ra = dict(Checkpoint(a).iter_tensors()); rb = dict(Checkpoint(b).iter_tensors())
    assert ra.keys() == rb.keys(), label
    same = sum(torch.equal(ra[k], rb[k]) for k in ra)
    worst = max(((ra[k].float() - rb[k].float()).abs().max().item() if ra[k].is_floating_point() else float(not torch.equal(ra[k], rb[k]))) for k in ra)
    print(f"{label}: {same}/{len(ra)} tensors bit-identical CPU vs CUDA, worst abs diff {worst:.3g}")
cmp("/tmp/g/m01-cpu", f"/tmp/g/m01-{G}", "merge 0.1b")
cmp("/tmp/g/q01-cpu", f"/tmp/g/q01-{G}", "quantize nf4 0.1b")
cmp("/tmp/g/qf-cpu", f"/tmp/g/qf-{G}", "quantize nf4 tiny-llama")
cmp("/tmp/g/x-cpu", f"/tmp/g/x-{G}", "extract rank 8 tiny-llama")
for d in ("cpu", G):
    r = json.load(open(f"/tmp/g/x-{d}.json")); t = r.get("totals", r)
    print("extract report", d, {k: t[k] for k in list(t)[:6]} if isinstance(t, dict) else t)
PY
for d in cpu $GPU; do
  echo "-- validate merged 0.1b --device $d"
  $L validate /tmp/g/base01 /tmp/g/lora01 --merged $W/m01-$GPU --device $d --json > $W/v01-$d.json; echo "exit $?"
  echo "-- validate quantized 0.1b --device $d"
  $L validate /tmp/g/base01 --quantized $W/q01-$GPU --device $d --json > $W/vq01-$d.json; echo "exit $?"
  for a in llama-lora llama-dora gpt2-lora; do
    b=fixtures/tiny-llama; case $a in gpt2*) b=fixtures/tiny-gpt2;; esac
    $L merge $b fixtures/$a -o $W/mf-$a --device $GPU --force >/dev/null
    $L validate $b fixtures/$a --merged $W/mf-$a --device $d --json > $W/vf-$a-$d.json; echo "validate $a $d exit $?"
  done
done
cd $W && tar czf $OUT/validate-json.tgz *.json
