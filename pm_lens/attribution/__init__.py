"""Stage 3: attribution patching ranks every SAE feature; exact ablation confirms the top."""

from pm_lens.attribution.ablate import Ablation as Ablation
from pm_lens.attribution.ablate import ablate as ablate
from pm_lens.attribution.attribute import attribute as attribute
from pm_lens.attribution.clean import CleanRun as CleanRun
from pm_lens.attribution.fidelity import FidelityCard as FidelityCard
from pm_lens.attribution.fidelity import check_fidelity as check_fidelity
from pm_lens.attribution.fidelity import fidelity as fidelity
from pm_lens.attribution.recovery import recover as recover
from pm_lens.attribution.result import Attribution as Attribution
