"""Microbenchmarks behind ``hgsim calibrate``, one module per job.

Measuring: ``memory`` (bandwidth and latency per NUMA node and thread count), ``mlp`` (lines in
flight per core: N-chain pointer chases, random row gathers), ``loaded`` (latency under a
background stream), ``row_cost`` (core work per gathered row), ``cpu_kernel`` (the
C attention kernel versus threads and context), ``standin`` (the CPU stand-in accelerator, when
there is no CUDA) and ``cuda`` (HBM, GEMM, attention, launch overhead, pinned copies) each plan a
list of ``settings.Job``; ``pinned`` runs a job on one socket's CPUs and ``quiet`` waits for a
quiet moment on a shared machine. Deriving: ``summarize`` (and ``summarize_mlp`` for the memory
model's in-flight and queueing figures, with the pure fits of ``fits``) turns raw
``records.Measurement`` rows into figures, each with the sentence that justifies it;
``topology`` says what the machine is; ``assemble`` maps both onto the profile schema and
``profile_writer`` writes commented YAML.

The orchestrator is ``hw_backend.calibrate``. Planning jobs before running them keeps the progress
bar honest (the total is known up front) and lets ``--quick`` shrink every benchmark in one place
(``settings``).
"""
