"""Stage 5b: feature dashboards in reward terms, and their export to Neuronpedia's JSON.

:func:`build_dashboards` computes each feature's page (:mod:`pm_lens.dashboard.build`),
:func:`write_dashboards` writes the static HTML and JSON (:mod:`pm_lens.dashboard.render`), and
:func:`write_neuronpedia` the Neuronpedia batch files (:mod:`pm_lens.dashboard.neuronpedia`).
"""

from pm_lens.dashboard.build import build_dashboards as build_dashboards
from pm_lens.dashboard.data import FeatureDashboard as FeatureDashboard

__all__ = ["FeatureDashboard", "build_dashboards"]
