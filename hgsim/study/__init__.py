"""Parameter studies: one YAML file in, data, figures and a report out.

``load_study`` validates and expands a study file (``load_study_data`` a dict; nothing is
written when it is wrong); ``run_study`` computes the points not yet stored and writes
results.parquet/csv, figures, report.md and study.resolved.yaml. See ``schema.py`` for the
file format and ``studies/`` for examples.
"""

from hgsim.study.load import StudyPlan, load_study, load_study_data
from hgsim.study.run import RunOptions, StudyRun, run_study

__all__ = ["RunOptions", "StudyPlan", "StudyRun", "load_study", "load_study_data", "run_study"]
