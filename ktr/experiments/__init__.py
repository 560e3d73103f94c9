"""Drivers of the scripts in `scripts/` (layer L4, entry-point level): ablations, benchmarks, the GPU check.

Each module is what one script runs, importable (tests and other scripts use it); the script itself only
parses its arguments, prints its table and writes its files. They may import `ktr.cli` (a run is `ktr fit`)
and anything below; nothing in ktr imports them.

- `ablation`: the controlled ablation of `scripts/ablate.py` (variants, one run, the shared warm start);
- `paper_ablations`: the paper's ablation figures as YAML overlays (`scripts/paper_ablations.py`);
- `bench_step`: memory and time of KTR training steps by phase (`scripts/bench_step.py`);
- `bench_loss`: naive vs chunked policy loss (`scripts/bench_loss.py`);
- `gpu_check`, `gpu_parts`, `gpu_decode`, `gpu_draw`: the one prepared GPU check (`scripts/gpu_check.py`);
- `machine`: what a measurement ran on, for the JSON beside each figure.

The statistics and tables of the ablations are `ktr.report.ablation` (layer L2).
"""
