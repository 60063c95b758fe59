#!/usr/bin/env bash
# Regenerate every benchmark table, JSON and plot of docs/benchmarks.md, one after the other.
# On a quiet 2-core machine with nothing cached this takes about 5 hours (training included;
# VGG-9 and the structured runs with 3 seeds are most of it);
# run a single line to refresh one table.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 benchmarks/engine_speed.py                                  # engine vs reference (LeNet-5)
python3 benchmarks/engine_speed.py --models vgg9                    # the VGG-9 row (extrapolated)
python3 benchmarks/engine_speed.py --tolerance-study 1e-6 1e-3 1e-2   # curvature intervals (LeNet-5)
# python3 benchmarks/vgg_tables.py                                # VGG-9 hop tables one by one (hours on 2 shared cores)
python3 benchmarks/channel_scale.py                                 # channel graph at ImageNet scale
python3 benchmarks/coverage.py                                      # tracer coverage: timm families, torchvision
python3 benchmarks/real_size.py --model resnet50 --images 4 --limit 1200   # MetaPruner step, full width
python3 benchmarks/unstructured.py --no-progress                    # the paper's figure
python3 benchmarks/unstructured.py --models vgg9 --seeds 0 1 2 --name unstructured_vgg9 --no-progress
python3 benchmarks/unstructured.py --models lenet5 --per-class 5 --name unstructured_pc5 --no-progress
python3 benchmarks/unstructured.py --models lenet5 --alpha 0.3 --name unstructured_alpha03 --no-progress
python3 benchmarks/unstructured.py --criteria magnitude random lamp wanda_row wanda_global snip curv_pos curv_pos_wanda_alloc --name unstructured_lamp --no-progress
python3 benchmarks/study.py                                         # the quality study (issue 13), development models
python3 benchmarks/study.py --heldout --name study_heldout          # ... and the held-out models
python3 benchmarks/granularity.py                                   # neuron vs channel (LeNet-5)
python3 benchmarks/structured.py                                    # Torch-Pruning criteria, timm models
python3 benchmarks/channel_fidelity.py --images 2                  # removed channels at a tolerance vs exact
