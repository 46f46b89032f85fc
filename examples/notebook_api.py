"""hgsim from Python, as a notebook would use it: python examples/notebook_api.py

Simulates one configuration, compares it on a modified profile, and runs a small study given
as a dict. Walkthrough: docs/python-api.md.
"""

import pandas as pd

from hgsim import api

# One configuration: a result object with pandas views.
result = api.simulate("h100-80gb-spr-cxl", "llama-2-13b", "hybridgen",
                      context="128k", batch=2, gen=16, samples=4)
print(result.table().loc[["tokens_per_s", "latency_mean_ms", "mem_cxl0_gb",
                          "accuracy_mass_kept"]])
print(result.steps_frame()[["step", "context", "latency_s", "topk_ratio"]].head(4))

# The same machine with a slower CXL expander: change fields by their dotted paths.
slow_cxl = api.with_overrides("h100-80gb-spr-cxl", {"tiers.cxl0.bandwidth_gbps": 8,
                                                    "tiers.cxl0.latency_ns": 400})
rows = []
for label, profile in (("shipped", "h100-80gb-spr-cxl"), ("slow CXL", slow_cxl)):
    for policy in ("hybridgen", "flexgen"):
        run = api.simulate(profile, "llama-2-13b", policy, context="128k", batch=2, gen=16,
                           samples=4)
        rows.append(run.to_frame().assign(machine=label))
compare = pd.concat(rows, ignore_index=True)
print(compare.pivot(index="policy", columns="machine", values="tokens_per_s").round(2))

# A study given as a dict (the same schema as a YAML file); returns its results table.
frame = api.run_study({
    "name": "notebook_api",
    "base": {"profile": "h100-80gb-spr-cxl", "model": "llama-2-13b",
             "workload": {"batch": 2, "gen": 8}, "fidelity": {"decode_samples": 2}},
    "sweep": {"grid": {"workload.context": ["32k", "128k"], "policy": ["hybridgen", "hgca"]}},
}, out="results/notebook_api", jobs=1, figures=False)
print(frame.pivot(index="workload.context", columns="policy", values="tokens_per_s").round(2))
print("study outputs in", frame.attrs["out"])
